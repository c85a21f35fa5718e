from tl_app.cli import main

main()
