"""Placeholder for the `figures` command until its issue lands."""


def add_arguments(parser):
    pass


def main(args) -> int:
    print("spectral-peft: this command is not implemented yet", flush=True)
    return 1
