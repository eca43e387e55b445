"""Evaluation commands, outside the protect path, one module or package per command: `frontier`
(+ `frontier_render`), `robustness`, `transfer` (what those two share: `common`), `imitation/`
and `report/`. Each exposes `build_parser(parser)` and `main(argv)` for pipeline/cli.py. Their
heavy libraries (diffusers, librosa, matplotlib, tqdm, scipy) come with the `[eval]` extra and
are imported only when used, through `extra.require` (a clear install hint when missing)."""
