"""The application layer: what wires the wings together for people. The command line (``cli``)
and the live demo (``demo``). It may import everything of ``relay``; nothing imports it.
"""
