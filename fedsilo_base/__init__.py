"""The ground floor both sides stand on: helpers every room may import, which import none of ours.

Modules, one job each:

* :mod:`fedsilo_base.errors`       ``UserError``, the base of every error a person can fix
* :mod:`fedsilo_base.atomic_files`  atomic file writes (temp file, fsync, rename, fsync folder)
* :mod:`fedsilo_base.fingerprints`  the grouped SHA-256 fingerprints people read out on the phone
* :mod:`fedsilo_base.process_tree`  stopping a Flower process with the SuperExec helpers it spawned
* :mod:`fedsilo_base.tls_probe`     a TLS handshake + ``GET /health`` against a SuperLink
* :mod:`fedsilo_base.home_folder`   the ``--home`` options (one env variable per home) and opening
                                    a home that must already exist
* :mod:`fedsilo_base.cli_runner`    the one runner of the three CLIs (one-line errors, ``--debug``)

No plans, no protocol, no Flower round logic lives here.
"""
