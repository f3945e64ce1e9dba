"""Storage backends: where an image's bytes live (a local file, a Ceph RBD image, an S3 object).

The contract every backend implements is ``storage.base.Storage``; format drivers, the cluster
cache and the image layer use only that contract and never know which backend they run on.
"""
