"""`python -m blastq`: the `blastq` command, for an environment whose scripts folder is not on PATH."""

from blastq.cli.main import main

if __name__ == "__main__":
    main(prog_name="blastq")
