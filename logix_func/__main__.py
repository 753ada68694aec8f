from .demo.cli import main

main()
