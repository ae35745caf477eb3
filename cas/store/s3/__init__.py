"""Chunk and ref stores in an S3 bucket (AWS S3 or any S3-compatible server), through boto3.

- :mod:`.bucket`: one bucket reached through boto3 (client, thread pool, retries, errors),
  shared by every store of that bucket;
- :mod:`.chunks`: the chunk store, records in pack objects with an index object each;
- :mod:`.refs`: the ref store, one object per ref.

Loaded only when an S3 store is first used (boto3 is optional and slow to import).
"""

from .bucket import S3AccessDeniedError, S3Bucket, parse_url
from .chunks import FORMAT_TEXT, S3ChunkStore, decode_index, encode_index
from .refs import S3RefStore, decode_ref_name, encode_ref_name

__all__ = ["FORMAT_TEXT", "S3AccessDeniedError", "S3Bucket", "S3ChunkStore", "S3RefStore", "decode_index",
           "decode_ref_name", "encode_index", "encode_ref_name", "parse_url"]
