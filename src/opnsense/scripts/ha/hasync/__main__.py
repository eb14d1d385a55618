from hasync.cli import run

run()
