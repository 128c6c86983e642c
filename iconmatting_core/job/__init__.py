"""The command line's job, shared by its local and Ray engines.

* :mod:`.targets`: which targets (folders searched recursively, globs, files, manifests) and the
  name each one's outputs get (a function of the file's own path, so names never change as a job grows);
* :mod:`.outputs`: output paths, what stops a job, the failures manifest, progress lines;
* :mod:`.record`: what made each output (source and recipe, carried by the output and indexed in
  ``--out``), which outputs a re-run skips, redoes or refuses, and the one-job-per-folder lock;
* :mod:`.clips`: a clip's outputs (alpha video, RGBA video, PNG sequence), written as its frames are matted;
* :mod:`.model_files`: finding and loading the model files, with one-line errors;
* :mod:`.cli_args`: the options and set-up the subcommands share;
* :mod:`.local`: the local engine; :mod:`.ray_engine` is the Ray one (images and clips on a pool of actors);
* :mod:`.encode`, :mod:`.matte`, :mod:`.convert`: the subcommands (``add_parser``, ``run``).
"""
