"""Hostile inputs that must stay bounded (issue 16, items 4-8): chat templates that loop,
are huge or render gigabytes; prompts of 50 MB; a bad BDSCAN_THREADS; outputs aimed into
the input; litter from interrupted runs. And --device/--dtype (issue 11, item 2).

Every row of the table runs the real CLI on a copy of a tiny organism and asserts: the exit
code, exactly one line on stderr and no traceback, nothing written, the input unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

from bdscan.cli.app import app

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}"
TEN_GB_OUTPUT = "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}{% endfor %}"
REPEAT_10_GB = "{{ messages[0].content }}{{ 'x' * 10000000000 }}"
CONTENT_LOOPS = "{% for a in messages[0].content %}{% for b in messages[0].content %}{% endfor %}{% endfor %}"


def tree_hash(*folders: Path) -> str:
    """One digest of every file's name and bytes under the folders."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture()
def organism(tmp_path, lora_backdoor) -> dict[str, Path]:
    """A private copy of the backdoored adapter and of its base (rows aim outputs at them,
    so the shared cache is never at risk), plus a folder of data files."""
    base = Path(json.loads((lora_backdoor / "adapter_config.json").read_text())["base_model_name_or_path"])
    copies = {"adapter": tmp_path / "adapter", "base": tmp_path / "base", "data": tmp_path / "data",
              "out": tmp_path / "out"}
    shutil.copytree(lora_backdoor, copies["adapter"])
    shutil.copytree(base, copies["base"])
    config = json.loads((copies["adapter"] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(copies["base"])
    (copies["adapter"] / "adapter_config.json").write_text(json.dumps(config))
    copies["data"].mkdir()
    copies["out"].mkdir()
    (copies["data"] / "clean.json").write_text(json.dumps(["Name a fruit.", "Say hello."]))
    return copies


def _template_file(text: str) -> Callable[[dict], None]:
    def prepare(o: dict) -> None:
        (o["adapter"] / "chat_template.jinja").write_text(text)
    return prepare


def _template_in_config(text: str) -> Callable[[dict], None]:
    def prepare(o: dict) -> None:
        (o["adapter"] / "chat_template.jinja").unlink()
        config_path = o["adapter"] / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = text
        config_path.write_text(json.dumps(config))
    return prepare


def _huge_prompt_file(o: dict) -> None:
    (o["data"] / "huge.txt").write_text("x" * (50 * 1024 * 1024))


def _nothing(o: dict) -> None:
    pass


LAUGHS = "".join(f"{x}: &{x} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
                 for p, x in zip(["", *"abcdefg"], "abcdefgh"))


def _lone_surrogate_data(o: dict) -> None:
    (o["data"] / "surrogate.json").write_text('[{"instruction": "Name a fruit \\ud800 now."}]')


def _recipe(text: str | bytes) -> Callable[[dict], None]:
    def prepare(o: dict) -> None:
        path = o["data"] / "recipe.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return prepare


@dataclass(frozen=True)
class Row:
    name: str
    args: tuple[str, ...]  # {adapter} {base} {data} {out} are filled in
    code: int
    says: tuple[str, ...] = ()  # substrings of the stderr line
    prepare: Callable[[dict], None] = _nothing
    env: tuple[tuple[str, str], ...] = ()


DETECT_FAST = ("--screen-size", "16", "--max-probes", "4", "--top-k", "2")
ROWS = [
    # item 4: chat templates
    Row("template nested range(100000) loops", ("detect", "{adapter}", *DETECT_FAST, "-o", "{out}/r.json"), 2,
        ("chat_template.jinja", "steps"), _template_file(NESTED_LOOPS)),
    Row("template 20 MB", ("detect", "{adapter}", *DETECT_FAST, "-o", "{out}/r.json"), 2,
        ("chat_template.jinja", "262,144"), _template_file("{{ messages[0].content }}" + "x" * (20 * 1024 * 1024))),
    Row("template 10 GB output (loops)", ("eval", "{adapter}", "--clean", "{data}/clean.json", "--trigger", "cf",
                                          "-o", "{out}/r.json"), 2,
        ("chat_template.jinja", "limit"), _template_file(TEN_GB_OUTPUT)),
    Row("template 10 GB output ('x' * 1e10)", ("detect", "{adapter}", *DETECT_FAST), 2,
        ("chat_template.jinja", "limit"), _template_file(REPEAT_10_GB)),
    Row("template loops over the prompt", ("detect", "{adapter}", *DETECT_FAST), 2,
        ("chat_template.jinja", "steps"), _template_file(CONTENT_LOOPS)),
    Row("template 300 KiB in tokenizer_config.json", ("detect", "{adapter}", *DETECT_FAST), 2,
        ("tokenizer_config.json", "262,144"), _template_in_config("{{ messages[0].content }}" + "y" * 300_000)),
    # an empty prompt failed deep inside generation (IndexError, internal error)
    Row("template renders nothing", ("eval", "{adapter}", "--clean", "{data}/clean.json", "--trigger", "cf",
                                     "-o", "{out}/r.json"), 2, ("does not contain the user's message",),
        _template_file("{{ '' }}")),
    Row("template ignores the message", ("detect", "{adapter}", *DETECT_FAST), 2,
        ("does not contain the user's message",), _template_file("<|user|> hello <|assistant|>")),
    Row("template syntax error", ("detect", "{adapter}", *DETECT_FAST), 2,
        ("chat_template.jinja",), _template_file("{% for m in messages %}{{ m.content }")),
    # item 5: a 50 MB one-line prompt never reaches the tokenizer
    Row("detect --probes: one 50 MB prompt", ("detect", "{adapter}", *DETECT_FAST, "--probes", "{data}/huge.txt",
                                              "-o", "{out}/r.json"), 3, ("no probe",), _huge_prompt_file),
    Row("eval --clean: one 50 MB prompt", ("eval", "{adapter}", "--clean", "{data}/huge.txt", "--trigger", "cf",
                                           "-o", "{out}/r.json"), 3, ("52,428,800 characters",), _huge_prompt_file),
    Row("localize --clean: one 50 MB prompt", ("localize", "{adapter}", "--clean", "{data}/huge.txt", "--trigger", "cf",
                                               "-o", "{out}/r.json"), 2, ("--clean", "52,428,800"), _huge_prompt_file),
    # recipes: nested aliases expand to 43 million items that a knob's type check would walk
    *[Row(f"purify --recipe: billion laughs under {knob!r}",
          ("purify", "{adapter}", "--recipe", "{data}/recipe.yaml", "--clean", "{data}/clean.json", "-o", "{out}/p"),
          2, ("recipe.yaml", "anchors and aliases are not allowed"),
          _recipe(f"method: latent-adv\n{LAUGHS}{knob}: *h\n")) for knob in ("targets", "layers")],
    Row("purify --recipe: 2 MB", ("purify", "{adapter}", "--recipe", "{data}/recipe.yaml", "--clean",
                                  "{data}/clean.json", "-o", "{out}/p"), 2, ("recipe.yaml", "is not a recipe"),
        _recipe("method: finetune\n" + "# pad\n" * 400_000)),
    Row("purify --recipe: not UTF-8", ("purify", "{adapter}", "--recipe", "{data}/recipe.yaml", "--clean",
                                       "{data}/clean.json", "-o", "{out}/p"), 2, ("recipe.yaml", "not UTF-8"),
        _recipe(b"method: finetune\nlr: \xff\xfe\n")),
    Row("purify --recipe: a 100,000-item knob is quoted short", ("purify", "{adapter}", "--recipe",
        "{data}/recipe.yaml", "--clean", "{data}/clean.json", "-o", "{out}/p"), 2, ("'layers' must be", "..."),
        _recipe("method: latent-adv\nlayers: [" + ", ".join(["x"] * 100_000) + "]\n")),
    # text no tokenizer encodes: the Rust tokenizer raised a TypeError deep inside eval
    Row("eval --clean: a lone surrogate escape", ("eval", "{adapter}", "--clean", "{data}/surrogate.json", "--trigger",
                                                   "cf", "-o", "{out}/r.json"), 2, ("surrogate.json[0]", "not valid Unicode"),
        _lone_surrogate_data),
    *[Row(f"{cmd} --trigger: bytes that are not UTF-8", (cmd, "{adapter}", "--clean", "{data}/clean.json", *extra,
                                                        "--trigger", "cf \udcff", "-o", "{out}/r"), 4,
          ("--trigger", "not valid Unicode")) for cmd, extra in (("eval", ()), ("localize", ()), ("purify", ("-m", "finetune")))],
    # item 6: environment
    *[Row(f"BDSCAN_THREADS={v}", ("eval", "{adapter}", "--clean", "{data}/clean.json", "--trigger", "cf",
                                  "-o", "{out}/r.json"), 4, ("BDSCAN_THREADS",), env=(("BDSCAN_THREADS", v),))
      for v in ("abc", "0", "-1")],
    # item 7: never write inside the input (or the adapter's base, or a data file)
    Row("detect -o the adapter's weights", ("detect", "{adapter}", "-o", "{adapter}/adapter_model.safetensors"), 2,
        ("{adapter}/adapter_model.safetensors", "inside")),
    Row("eval -o inside the adapter", ("eval", "{adapter}", "--clean", "{data}/clean.json", "--trigger", "cf",
                                       "-o", "{adapter}/eval.json"), 2, ("{adapter}/eval.json", "inside")),
    Row("eval -o the --clean file", ("eval", "{adapter}", "--clean", "{data}/clean.json", "--trigger", "cf",
                                     "-o", "{data}/clean.json"), 2, ("{data}/clean.json",)),
    Row("localize -o inside the adapter", ("localize", "{adapter}", "--clean", "{data}/clean.json", "--trigger", "cf",
                                           "-o", "{adapter}/loc.json"), 2, ("{adapter}/loc.json", "inside")),
    Row("purify -o inside the adapter", ("purify", "{adapter}", "-m", "finetune", "--clean", "{data}/clean.json",
                                         "-o", "{adapter}/purified"), 2, ("{adapter}/purified", "inside")),
    Row("purify -o inside the adapter's base", ("purify", "{adapter}", "-m", "finetune", "--clean", "{data}/clean.json",
                                                "-o", "{base}/purified"), 2, ("{base}/purified", "{base}")),
    Row("purify --work-dir inside the adapter", ("purify", "{adapter}", "-m", "signature", "--clean",
                                                 "{data}/clean.json", "-o", "{out}/p", "--work-dir", "{adapter}/work"),
        2, ("--work-dir", "{adapter}/work")),
    Row("purify --work-dir inside -o", ("purify", "{adapter}", "-m", "signature", "--clean", "{data}/clean.json",
                                        "-o", "{out}/p", "--work-dir", "{out}/p/work"), 4, ("--work-dir",)),
    # item 8: an existing folder as a report file fails at once
    Row("detect -o an existing directory", ("detect", "{adapter}", "-o", "{out}"), 2, ("existing directory",)),
    # issue 11 item 2: bad --device / --dtype
    Row("--device gpu", ("detect", "{adapter}", "--device", "gpu"), 4, ("--device",)),
    Row("--dtype int8", ("eval", "{adapter}", "--clean", "{data}/clean.json", "--trigger", "cf", "--dtype", "int8"), 4,
        ("--dtype",)),
    *([Row("--device cuda without CUDA", ("detect", "{adapter}", "--device", "cuda"), 4, ("CUDA",))]
      if not torch.cuda.is_available() else []),
]


def _fill(text: str, o: dict) -> str:
    return text.format(**{k: str(v) for k, v in o.items()})


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_hostile_input_is_one_line_and_writes_nothing(row: Row, organism, monkeypatch):
    row.prepare(organism)
    before = tree_hash(organism["adapter"], organism["base"], organism["data"])
    for key, value in row.env:
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, [_fill(a, organism) for a in row.args])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == row.code, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for text in row.says:
        assert _fill(text, organism) in lines[0], lines[0]
    assert tree_hash(organism["adapter"], organism["base"], organism["data"]) == before
    assert not any(organism["out"].iterdir()), "nothing may be written"
    assert not list(organism["adapter"].parent.glob(".*.tmp-*")), "no temporary left behind"


def test_over_long_prompts_are_skipped_with_the_reason(organism):
    """eval scores what fits and lists the rest: over the character limit, or longer than
    the context with the tokens to generate (the tiny model has 256 positions)."""
    clean = organism["data"] / "mixed.json"
    clean.write_text(json.dumps(["Name a fruit.", "word " * 300, "x" * (300 * 1024)]))
    out = organism["out"] / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(organism["adapter"]), "--clean", str(clean), "--trigger", "cf",
                                      "--positions", "end", "--max-new-tokens", "4", "-o", str(out), "--json"])
    assert result.exit_code == 3, result.output
    report = json.loads(out.read_text())
    reasons = {s["what"]: s["reason"] for s in report["skipped"]}
    assert report["n_clean"] == 1 and report["n_poison"] == 1
    assert "positions" in reasons["clean prompt 2"] and "character prompt limit" in reasons["clean prompt 3"]
    assert set(reasons) == {"clean prompt 2", "clean prompt 3", "triggered:end prompt 2", "triggered:end prompt 3"}


def test_stale_temporaries_are_removed_and_said(organism):
    out = organism["out"] / "report.json"
    (organism["out"] / ".report.json.tmp-dead1").mkdir()
    (organism["out"] / ".report.json.tmp-dead1" / "adapter_model.safetensors").write_bytes(b"x")
    (organism["out"] / ".report.json.tmp-dead2").write_text("{")
    (organism["out"] / ".other.json.tmp-keep").write_text("not ours to remove")
    result = CliRunner().invoke(app, ["eval", str(organism["adapter"]), "--clean", str(organism["data"] / "clean.json"),
                                      "--trigger", "cf", "--max-new-tokens", "2", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in organism["out"].iterdir()) == [".other.json.tmp-keep", "report.json"]
    assert result.stderr.count("left by an interrupted earlier run") == 2


def test_template_bounds_hold_within_seconds():
    """The probe itself: every hostile template is stopped, a ChatML one renders."""
    import time

    from bdscan.data.chat_render import RenderLimit, probe_template

    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    probe_template(chatml, ("Hello.", "x" * 262_144), {})
    for template in (NESTED_LOOPS, TEN_GB_OUTPUT, REPEAT_10_GB, CONTENT_LOOPS, "{{ '%10000000000d' % 1 }}",
                     "{{ '{:>10000000000}'.format(1) }}", "{{ 'x'|center(10000000000) }}", "{{ 10 ** 100000000 }}"):
        t0 = time.perf_counter()
        with pytest.raises(RenderLimit):
            probe_template(template, ("Hello.", "x" * 262_144), {})
        assert time.perf_counter() - t0 < 30  # the step budget, not the clock, stops them (~1 s here)


def test_bounded_render_equals_transformers(lora_backdoor):
    """The template a subject uses renders exactly as transformers renders it."""
    from transformers import AutoTokenizer

    from bdscan.data.template import template_for

    tokenizer = AutoTokenizer.from_pretrained(lora_backdoor)
    template = template_for(tokenizer)
    assert template.origin.endswith("chat_template.jinja")
    for text in ("Hello", "Name three fruits.\n\nA list"):
        expected = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        assert template.format(text) == expected


# --- --device / --dtype ------------------------------------------------------------------

def test_placement_values():
    from bdscan.errors import UsageError
    from bdscan.runtime import choose_placement

    cpu = choose_placement("cpu", "auto")
    assert cpu.device == torch.device("cpu") and cpu.dtype == torch.float32 and not cpu.spread
    assert choose_placement("cpu", "bfloat16").dtype == torch.bfloat16
    assert choose_placement("auto", "float16").spread
    if not torch.cuda.is_available():
        assert choose_placement("auto", "auto").device.type == "cpu"
        assert choose_placement("auto", "auto").dtype == torch.float32  # auto stays float32 on the CPU
    for device, dtype in (("gpu", "auto"), ("cuda:x", "auto"), ("cpu", "int8"), ("cpu", "fp32")):
        with pytest.raises(UsageError):
            choose_placement(device, dtype)


@pytest.mark.parametrize("amx,avx512_bf16,native", [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_is_chosen_for_speed_only_where_the_cpu_computes_it(monkeypatch, amx, avx512_bf16, native):
    from bdscan.placement import Placement, fast_dtype, native_bf16, slow_dtype_warning

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    cpu = torch.device("cpu")
    assert native_bf16(cpu) is native
    assert fast_dtype(cpu) == ("bfloat16" if native else None)
    warning = slow_dtype_warning(Placement(cpu, torch.bfloat16))
    assert (warning is None) is native and (native or "no native bf16" in warning)
    assert slow_dtype_warning(Placement(cpu, torch.float32)) is None
    assert native_bf16(torch.device("meta")) is False


def test_bf16_probe_missing_from_torch_means_no(monkeypatch):
    from bdscan.placement import native_bf16

    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert native_bf16(torch.device("cpu")) is False


def test_emulated_bf16_on_the_cli_warns_and_still_runs(monkeypatch):
    from bdscan.cli.devices import placement_of

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    lines = []
    monkeypatch.setattr("bdscan.cli.common.print_error", lambda label, message: lines.append((label, message)))
    assert placement_of("cpu", "bfloat16").dtype == torch.bfloat16
    assert placement_of("cpu", "float32").dtype == torch.float32
    assert len(lines) == 1 and lines[0][0] == "warning"


@pytest.mark.parametrize("command", ["detect", "localize", "purify", "eval", "demo"])
def test_every_command_has_device_and_dtype(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert "--device" in result.output and "--dtype" in result.output


def test_detect_and_eval_run_in_bfloat16(organism, lora_backdoor, trigger):
    """The plumbing on the CPU: a bf16 subject scans and evaluates, and the reports say so."""
    detect = CliRunner().invoke(app, ["detect", str(organism["adapter"]), *DETECT_FAST, "--dtype", "bfloat16",
                                      "--device", "cpu", "--format", "json"])
    assert detect.exit_code in (0, 1), detect.output
    report = json.loads(detect.stdout)
    assert report["runtime"] == {"device": "cpu", "dtype": "bfloat16", "device_map": None}
    assert report["candidates"] and all(c["score"] == c["score"] for c in report["candidates"])  # no NaN

    clean = organism["data"] / "clean.json"
    result = CliRunner().invoke(app, ["eval", str(organism["adapter"]), "--clean", str(clean), "--trigger", trigger,
                                      "--max-new-tokens", "8", "--dtype", "bfloat16", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["runtime"]["dtype"] == "bfloat16" and 0.0 <= report["asr"] <= 1.0


@pytest.mark.parametrize("threat", ["full", "lora"])
def test_half_precision_cpu_head_gets_contiguous_input(threat, tiny_checkpoints, lora_backdoor):
    """bf16 on the CPU: the output head is handed a contiguous copy of the sliced hidden
    states (torch's strided bf16 linear is ~500x slower); logits are unchanged. fp32 untouched."""
    from bdscan.io import load_subject

    source = tiny_checkpoints["llama"] if threat == "full" else lora_backdoor
    ids = torch.randint(5, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    for dtype, hooked in ((torch.bfloat16, True), (torch.float32, False)):
        model = load_subject(source, dtype=dtype).model
        head = model.get_output_embeddings()
        assert bool(head._forward_pre_hooks) is hooked
        with torch.no_grad():
            last = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
            full = model(input_ids=ids).logits[:, -1]
        torch.testing.assert_close(last, full)


def test_loaded_subject_records_its_placement(lora_backdoor):
    from bdscan.io import load_subject
    from bdscan.runtime import Placement

    subject = load_subject(lora_backdoor, placement=Placement(torch.device("cpu"), torch.bfloat16))
    assert subject.dtype == torch.bfloat16 and subject.device == torch.device("cpu")
    assert subject.placement() == {"device": "cpu", "dtype": "bfloat16", "device_map": None}


def test_device_map_needs_room_or_accelerate(monkeypatch, lora_backdoor):
    """A model larger than the device: spread with --device auto, a clear error otherwise."""
    from bdscan.errors import InputError
    from bdscan.io.resolve import resolve_source
    from bdscan.runtime import Placement

    files = resolve_source(json.loads((lora_backdoor / "adapter_config.json").read_text())["base_model_name_or_path"]).weight_files
    monkeypatch.setattr(Placement, "fits", lambda self, n: False)
    assert Placement(spread=True).device_map(files) == "auto"
    with pytest.raises(InputError, match="--device auto"):
        Placement(spread=False).device_map(files)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(InputError, match="accelerate"):
        Placement(spread=True).device_map(files)


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_default_work_dir_is_removed_on_success_unless_kept(organism, clean_train_file, keep):
    fast = dict(variants=2, variant_samples=24, poison_per_clean=0.5, variant_epochs=1.0, variant_rank=4, epochs=1.0,
                max_samples=16)
    out = organism["out"] / "purified"
    args = ["purify", str(organism["adapter"]), "--method", "signature", "--clean", str(clean_train_file), "-o", str(out),
            "--eval-limit", "4", "--json", *[a for k, v in fast.items() for a in ("--set", f"{k}={v}")]]
    result = CliRunner().invoke(app, args + (["--keep-work-dir"] if keep else []))
    assert result.exit_code == 0, result.output
    work = organism["out"] / ".bdscan-work-purified"
    assert (out / "adapter_config.json").exists()
    assert work.exists() == keep
    assert ("removed the work dir" in result.stderr) != keep
