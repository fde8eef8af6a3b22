from cerman.cli import main

main()
