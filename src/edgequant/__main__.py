from edgequant.cli.main import main

main()
