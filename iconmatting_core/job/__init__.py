"""The command line's job, shared by its local and Ray engines.

* :mod:`.targets`: which targets (folders searched recursively, globs, files, manifests) and the
  name each one's outputs get (a function of the file's own path, so names never change as a job grows);
* :mod:`.outputs`: output paths, safe writes, the failures manifest, progress lines;
* :mod:`.model_files`: finding and loading the model files, with one-line errors;
* :mod:`.local`: the local engine; ``ray_engine`` is the Ray one;
* :mod:`.commands`: the ``encode``, ``matte`` and ``convert`` subcommands (``add_parser``, ``run``).
"""
