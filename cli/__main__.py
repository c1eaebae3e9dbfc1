from lmpipe.cli.app import main

main()
