"""Only the optional C extension; everything else is in pyproject.toml.

`warp._batchio` (recvmmsg/sendmmsg) is optional: without a compiler or the Python headers the
build says so and the install goes on; warp/paths/batch_io.py then uses its pure-Python path.
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "warp._batchio",
            ["warp/_batchio.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
    if sys.platform.startswith("linux")
    else [],
)
