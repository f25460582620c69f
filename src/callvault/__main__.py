from callvault.cli import main

main()
