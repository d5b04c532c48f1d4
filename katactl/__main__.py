from katactl.cli import main

if __name__ == "__main__":
    try:
        main()
    finally:
        # CPython remembers a KeyboardInterrupt that ended an exec() of a string (a dataclass
        # being defined when Ctrl-C or a SIGTERM landed: pythonrun.c run_eval_code_obj) and,
        # under `python -m`, then dies by SIGINT whatever exit code katactl chose (Modules/
        # main.c Py_RunMain); a string exec starts by clearing that flag
        exec("")
