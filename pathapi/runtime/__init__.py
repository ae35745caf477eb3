"""The runtime: App, Flow, Work, and the processes that run works.

Nothing is imported here, so that importing one module of the runtime (the transfer layer
imports :mod:`pathapi.runtime.context`) does not import all of it.
"""
