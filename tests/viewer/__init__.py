"""The OHIF viewer check's helpers: Orthanc subprocess, same-origin proxy, cached downloads."""
