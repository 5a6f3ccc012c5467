from prefork.cli import main

main()
