from bdscan.cli.app import main

main()
