"""The benchmark harness: grid specs (`grid`), what a cell runs (`programs`: a recipe or a registered job), the
resumable subprocess runner (`runner`), what each record holds besides metrics (`provenance`), and tables and plots
rendered from the records alone (`report`, with `pairs` for grids that compare runs side by side).

It ships with the package, so any command can run cells and write the same records. From a checkout:
`python benchmarks/run.py GRID.yaml` (= `python -m peftlab.harness.runner`), then
`python benchmarks/report.py benchmarks/results/<grid>` (= `python -m peftlab.harness.report`).
"""
