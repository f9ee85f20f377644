"""`python -m train.recipe`: the earlier command line of `python -m train.miniature`, kept as its alias."""

import runpy

if __name__ == "__main__":
    runpy.run_module("train.miniature", run_name="__main__", alter_sys=True)
