"""Signed contributions: Ed25519 keys, and signatures over an object's root and metadata.

A merge may require every contribution to be signed by a key in its replicated trusted-key set
(``MergeDocument.trusted_keys``, an add-wins OR-Set). The signature travels *inside* the object,
so every replica can check it from the manifest alone, whoever it fetched the object from:

- the contribution's merge-relevant metadata gets ``"signer"`` (the 32-byte Ed25519 public key
  as 64 lower-case hex) and ``"signature"`` (64 bytes as 128 hex);
- the **unsigned root** is the object root computed with the metadata *without*
  ``"signature"`` (the signer and the parameters included), i.e.
  ``object_root(metadata - {"signature"}, tensor leaves, chunk_size)``;
- the signed message is the canonical msgpack of ``["crdtmerge/v1/contribution-signature",
  unsigned root, metadata - {"signature"}]``: domain separated (it can never be mistaken for any
  other message we sign or hash), canonical (one encoding per value) and bound to every tensor
  byte through the root's Merkle tree;
- the object's real root covers the signature too, so the whole signed object is
  content-addressed like any other. Ed25519 (RFC 8032) is deterministic: signing the same
  tensors and metadata with the same key always gives the same bytes and the same root.

Which contributions a merge uses is a pure function of the replicated state and the objects'
bytes (:func:`eligible_roots`): with an empty trusted-key set every live root counts; otherwise
only roots whose signature verifies and whose signer is a live trusted key. Replicas therefore
agree no matter in which order they learnt of keys and contributions.

Key files: the private key is PKCS#8 PEM (unencrypted, mode 0600; a 64-hex raw seed is
accepted when loading) and the public key is one line of 64 hex characters (``<key>.pub``).

Example:
    >>> import torch
    >>> key = generate_key()
    >>> m = sign_tensors({"w": torch.ones(2)}, key, {"params": {"weight": 0.5}})
    >>> verify_manifest(m) == public_key_bytes(key)
    True
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .canonical import canonical_pack
from .errors import Forbidden, IntegrityError, InvalidInput
from .identity import Manifest, hash_tensors, object_root

__all__ = [
    "SIGNATURE_DOMAIN",
    "SIGNATURE_FIELD",
    "SIGNER_FIELD",
    "check_trusted",
    "eligible_roots",
    "generate_key",
    "load_private_key",
    "load_public_key",
    "parse_public_key",
    "public_key_bytes",
    "save_private_key",
    "sign_manifest",
    "sign_tensors",
    "signing_message",
    "unsigned_root",
    "verify_manifest",
]

SIGNATURE_DOMAIN = "crdtmerge/v1/contribution-signature"
SIGNER_FIELD = "signer"
SIGNATURE_FIELD = "signature"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")


def _bad_signature(detail: str) -> IntegrityError:
    return IntegrityError(detail, code="bad_signature")


# -- keys --------------------------------------------------------------------------------------


def generate_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key (from the OS random source)."""
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of the public key (what the trusted-key set holds)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def save_private_key(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``path`` (PKCS#8 PEM, mode 0600) and ``path.pub`` (64 hex); refuse to overwrite.

    Returns:
        ``(private key path, public key path)``.

    Raises:
        InvalidInput: either file already exists.
    """
    priv = Path(path)
    pub = priv.with_name(priv.name + ".pub")
    for p in (priv, pub):
        if p.exists():
            raise InvalidInput(f"{p} already exists; refusing to overwrite a key")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_text(public_key_bytes(key).hex() + "\n")
    return priv, pub


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a private key file: PKCS#8 PEM, or a raw 32-byte seed as 64 hex characters.

    Raises:
        InvalidInput: missing file, or not an (unencrypted) Ed25519 private key.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read the signing key {p}: {exc.strerror}") from None
    text = data.strip()
    if _HEX64.match(text.decode("latin-1")):
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text.decode()))
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(
            f"{p} is not an unencrypted PEM private key or a 64-hex seed "
            f"(make one with `crdtmerge keygen`): {exc}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInput(f"{p} holds a {type(key).__name__}; expected an Ed25519 key")
    return key


def parse_public_key(text: str) -> bytes:
    """A public key from 64 hex characters (surrounding white space ignored).

    Raises:
        InvalidInput: anything else.
    """
    value = text.strip().lower()
    if not _HEX64.match(value):
        raise InvalidInput(
            f"{text.strip()[:80]!r} is not an Ed25519 public key: expected 64 hex characters "
            "(the content of a `crdtmerge keygen` .pub file)"
        )
    return bytes.fromhex(value)


def load_public_key(value: str | os.PathLike[str]) -> bytes:
    """A public key given as 64 hex, or as the path of a ``.pub`` (hex) or PEM public key file.

    Raises:
        InvalidInput: not a key, or an unreadable file.
    """
    if isinstance(value, str) and _HEX64.match(value.strip().lower()):
        return parse_public_key(value)
    p = Path(value)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{value} is neither 64 hex characters nor a readable key file") from exc
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key: Any = serialization.load_pem_public_key(data)
        except ValueError:
            key = load_private_key(p).public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidInput(f"{p} holds a {type(key).__name__}; expected an Ed25519 key")
        return public_key_bytes(key)
    return parse_public_key(data.decode("latin-1"))


# -- signatures --------------------------------------------------------------------------------


def signing_message(unsigned: bytes, metadata: Mapping[str, Any]) -> bytes:
    """The exact bytes an Ed25519 signature covers (see the module docstring)."""
    if SIGNATURE_FIELD in metadata:
        raise InvalidInput("the signed metadata cannot contain the signature itself")
    return canonical_pack([SIGNATURE_DOMAIN, bytes(unsigned), dict(metadata)])


def _without_signature(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k != SIGNATURE_FIELD}


def unsigned_root(manifest: Manifest) -> bytes:
    """The root the object would have without its ``"signature"`` metadata field."""
    return object_root(
        _without_signature(manifest.metadata),
        [e.leaf() for e in manifest.tensors],
        chunk_size=manifest.chunk_size,
    )


def sign_manifest(key: Ed25519PrivateKey, manifest: Manifest) -> Manifest:
    """The signed version of ``manifest``: same tensors, metadata plus signer and signature.

    Any signer or signature already present is replaced.
    """
    meta = {
        **{k: v for k, v in manifest.metadata.items() if k not in (SIGNER_FIELD, SIGNATURE_FIELD)},
        SIGNER_FIELD: public_key_bytes(key).hex(),
    }
    leaves = [e.leaf() for e in manifest.tensors]
    unsigned = object_root(meta, leaves, chunk_size=manifest.chunk_size)
    signature = key.sign(signing_message(unsigned, meta))
    return Manifest.build(
        manifest.tensors, {**meta, SIGNATURE_FIELD: signature.hex()}, chunk_size=manifest.chunk_size
    )


def sign_tensors(
    src: Any,
    key: Ed25519PrivateKey,
    metadata: Mapping[str, Any] | None = None,
    **kw: Any,
) -> Manifest:
    """Hash ``src`` (anything :func:`~crdtmerge.identity.hash_tensors` takes) and sign it.

    Args:
        src: the tensor set.
        key: the contributor's private key.
        metadata: merge-relevant metadata; ``None`` reads it from the file.

    Returns:
        The signed manifest: write ``contribution_metadata_header(manifest.metadata)`` into the
        file's ``__metadata__`` and it hashes to ``manifest.root``.
    """
    return sign_manifest(key, hash_tensors(src, metadata=metadata, **kw))


def verify_manifest(manifest: Manifest) -> bytes | None:
    """The verified signer (32 bytes) of an object, or None if it is not signed.

    Raises:
        IntegrityError (code ``bad_signature``): a signer without a signature (or the
            reverse), malformed fields, or a signature that does not verify.
    """
    meta = manifest.metadata
    has_signer, has_sig = SIGNER_FIELD in meta, SIGNATURE_FIELD in meta
    if not has_signer and not has_sig:
        return None
    if has_signer != has_sig:
        missing = SIGNATURE_FIELD if has_signer else SIGNER_FIELD
        raise _bad_signature(f"the contribution's metadata has no {missing!r}: re-sign it")
    signer, signature = meta[SIGNER_FIELD], meta[SIGNATURE_FIELD]
    if not isinstance(signer, str) or not _HEX64.match(signer):
        raise _bad_signature("metadata 'signer' must be an Ed25519 public key as 64 hex")
    if not isinstance(signature, str) or not _HEX128.match(signature):
        raise _bad_signature("metadata 'signature' must be 64 bytes as 128 hex")
    public = bytes.fromhex(signer)
    unsigned_meta = _without_signature(meta)
    message = signing_message(unsigned_root(manifest), unsigned_meta)
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(bytes.fromhex(signature), message)
    except (InvalidSignature, ValueError):
        raise _bad_signature(
            f"the signature does not verify for signer {signer[:16]}…: the tensors or "
            "metadata were changed after signing, or it was signed for another object"
        ) from None
    return public


def eligible_roots(
    roots: Iterable[bytes],
    trusted_keys: Collection[bytes],
    signer_of: Callable[[bytes], bytes | None],
) -> tuple[list[bytes], list[bytes]]:
    """Split live ``roots`` into ``(included, excluded)`` for a merge with ``trusted_keys``.

    A pure function of the replicated state (roots, keys) and the objects' content: with no
    trusted key every root is included; otherwise a root is included iff its signature
    verifies and its signer is in ``trusted_keys``. Order is kept.

    Args:
        roots: the live contribution roots.
        trusted_keys: the merge's live trusted keys (32 bytes each).
        signer_of: the verified signer of a root (e.g. ``verify_manifest(store.manifest(r))``),
            None if unsigned; may raise ``IntegrityError`` for a bad signature (excluded).
    """
    roots = list(roots)
    if not trusted_keys:
        return roots, []
    trusted = frozenset(trusted_keys)
    included: list[bytes] = []
    excluded: list[bytes] = []
    for root in roots:
        try:
            signer = signer_of(root)
        except IntegrityError:
            signer = None
        (included if signer is not None and signer in trusted else excluded).append(root)
    return included, excluded


def check_trusted(manifest: Manifest, trusted_keys: Collection[bytes]) -> bytes | None:
    """The ingest check: verify any signature; with trusted keys, require a trusted signer.

    Returns:
        The verified signer, or None for an unsigned object when no key is trusted.

    Raises:
        IntegrityError: a signature that does not verify (422).
        Forbidden: the merge requires signatures and the signer is absent or not trusted (403).
    """
    signer = verify_manifest(manifest)
    if not trusted_keys:
        return signer
    if signer is None:
        raise Forbidden(
            "this merge accepts only signed contributions: sign it with a trusted key "
            "(`crdtmerge push --sign KEY`)",
            code="signature_required",
        )
    if signer not in frozenset(trusted_keys):
        raise Forbidden(
            f"signer {signer.hex()[:16]}… is not in this merge's trusted keys; an admin "
            "must trust it first",
            code="untrusted_signer",
        )
    return signer
