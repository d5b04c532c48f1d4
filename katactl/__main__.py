"""``python -m katactl`` and the ``katactl`` console script (pyproject: katactl.__main__:run)."""


def run() -> None:
    from katactl import interrupt

    # before the ~40 ms import of the CLI: a SIGTERM there is the run's interrupt (exit 130,
    # the JSON error), not the default action's death
    interrupt.hold_early()
    from katactl.cli import main

    try:
        main()
    finally:
        # CPython remembers a KeyboardInterrupt that ended an exec() of a string (a dataclass
        # being defined when Ctrl-C or a SIGTERM landed: pythonrun.c run_eval_code_obj) and,
        # under `python -m`, then dies by SIGINT whatever exit code katactl chose (Modules/
        # main.c Py_RunMain); a string exec starts by clearing that flag
        exec("")


if __name__ == "__main__":
    run()
