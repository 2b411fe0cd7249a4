from AbdomenSegLib.cli import run

run()
