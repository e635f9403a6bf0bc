"""The benchmark harness: grid specs (`grid`), the resumable subprocess runner (`runner`), what each record holds
besides metrics (`provenance`), and tables and plots rendered from the records alone (`report`).

Run it through the scripts beside this folder: `python benchmarks/run.py GRID.yaml`, then
`python benchmarks/report.py benchmarks/results/<grid>`.
"""
