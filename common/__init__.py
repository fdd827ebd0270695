"""Neutral things every package of the project may use; this package imports nothing of the project.

- :mod:`common.errors`: :class:`~common.errors.UserError` (one-line user mistakes) and
  :class:`~common.errors.DataWarning`.
- :mod:`common.cli`: :func:`~common.cli.run_cli`, the runner of every command-line tool.
- :mod:`common.modality`: the modality names and their integer codes (0 rgb, 1 ir).
- :mod:`common.interrupts`: Ctrl-C and SIGTERM as one line and an exit status, no orphaned child.
- :mod:`common.outputs`: output paths checked before work starts; a full disk as one line.
- :mod:`common.textfiles`: users' text files read as UTF-8, UTF-8 with BOM or UTF-16 with BOM.
"""
