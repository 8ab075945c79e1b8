"""`python -m lite_llm.cli`: the same as the `lite-llm` command."""

from . import main

main()
