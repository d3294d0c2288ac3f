from bebop.cli.app import main

main()
