"""The one thing pyproject.toml cannot say: media._rtpcore, an optional C extension.

Without a C compiler (or Python's headers) the build goes on without it and media/lean.py
runs its pure-Python equivalents (slower per packet, same results).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("media._rtpcore", ["media/_rtpcore.c"], optional=True, libraries=["m"],
                             extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"])])
