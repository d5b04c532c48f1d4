"""One module per command group: parse -> call the library -> render.

A command module keeps heavy imports inside functions; see katactl.cli.REGISTRY.
"""
