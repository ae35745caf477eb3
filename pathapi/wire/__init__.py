"""The origin protocol (docs/format.md, "Origin protocol"): its constants, the encode and
decode of every body and header (:mod:`.codec`), the consumer's end (:mod:`.client`) and
the origin service (:mod:`.origin`).
"""
