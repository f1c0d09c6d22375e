from rmkit.cli import main

main()
