from cispo.service.cli import main

main()
