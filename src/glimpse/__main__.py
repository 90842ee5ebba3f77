from glimpse.cli import main

main()
