"""`balancerd tui`: the on-call console (Textual), over the daemon's state API.

Only the widget modules and :mod:`balancerd.tui.app` import Textual; :mod:`balancerd.tui.model` and
:mod:`balancerd.tui.text` (``--once``) do not.
"""
