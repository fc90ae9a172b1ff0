"""Hypothesis strategies made from (proto3) protobuf descriptors, for fuzzing a gRPC service with no per-message
code.

messages(descriptor): messages of that type, each field set or left unset (proto3 `optional` presence included),
at most one member of each oneof, repeated fields of a few items, nested messages drawn the same way; scalars over
their type's whole range (the edges, NaN and infinities included) and odd unicode, very long strings too.
near(valid): messages like a valid one with a field or two drawn anew, to get past the first checks.
wire_bytes(descriptor): request bodies below the message level: random bytes, a message's encoding cut or with a
byte changed, and records that reuse the message's field numbers with the wrong wire type, varints wider than the
field, bad UTF-8 and lengths past the end.
"""

from __future__ import annotations

import operator

from google.protobuf.descriptor import Descriptor
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

INT_RANGES = {}
for types, bits, signed in (((F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32), 32, True),
                            ((F.TYPE_UINT32, F.TYPE_FIXED32), 32, False),
                            ((F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64), 64, True),
                            ((F.TYPE_UINT64, F.TYPE_FIXED64), 64, False)):
    INT_RANGES.update(dict.fromkeys(types, (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)))

CHARS = st.characters(exclude_categories=("Cs",))  # a lone surrogate has no UTF-8: the client cannot send it
ODD_TEXT = ["", " ", "\x00", "\u202e", "\ufeff", "a\u0301", "\U0010ffff", "🦜🦜", "\r\n\t", "%s%n{}", "{{ x }}{% if %}",
            "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "User:", "<|im_start|>"]


def texts(known: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """Odd unicode, short and (rarely) tens of thousands of characters long; `known`: strings that mean something
    to the server (a role, the model's name, a live session id), so that fuzzing gets past its first checks."""
    long = st.builds(operator.mul, st.text(CHARS, min_size=1, max_size=3), st.integers(1000, 40000))
    known = st.sampled_from(known or ("",))
    odd = st.one_of(st.text(CHARS, max_size=30), st.sampled_from(ODD_TEXT))
    return st.sampled_from([known] * 4 + [odd] * 5 + [long]).flatmap(lambda s: s)  # one in ten long


def scalars(field, text: st.SearchStrategy[str]) -> st.SearchStrategy:
    t = field.type
    if t in INT_RANGES:
        lo, hi = INT_RANGES[t]
        return st.one_of(st.integers(max(lo, -3), 300), st.integers(lo, hi), st.sampled_from([lo, hi]))
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        width = 32 if t == F.TYPE_FLOAT else 64
        # in [0, 1] (where a probability lies), near it, and anywhere: NaN, ±inf, huge, tiny
        return st.one_of(st.floats(0, 1, width=width), st.floats(-3, 3, width=width), st.floats(width=width))
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return text
    if t == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == F.TYPE_ENUM:  # proto3 enums are open: a number the enum does not name is sent as it is
        named = st.sampled_from([v.number for v in field.enum_type.values])
        return named if field.enum_type.is_closed else st.one_of(named, st.integers(-2 ** 31, 2 ** 31 - 1))
    raise TypeError(f"no strategy for field {field.full_name} (type {t})")


def fields(field, text: st.SearchStrategy[str], depth: int = 0) -> st.SearchStrategy:
    """Values for the field: a list for a repeated one, a dict for a map, a message for a message one; below four
    levels of messages, none (an empty list or dict)."""
    deep = field.type == F.TYPE_MESSAGE and depth >= 4
    if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields
        return st.dictionaries(fields(key, text, depth), fields(value, text, depth), max_size=0 if deep else 4)
    if field.type == F.TYPE_MESSAGE:
        value = st.nothing() if deep else messages(field.message_type, text, depth + 1)
    else:
        value = scalars(field, text)
    return st.lists(value, max_size=0 if deep else 6) if field.is_repeated else value


def messages(descriptor: Descriptor, text: st.SearchStrategy[str] | None = None, depth: int = 0):
    text = texts() if text is None else text

    def of(field):
        return fields(field, text, depth)

    oneofs = [o for o in descriptor.oneofs if len(o.fields) > 1]  # proto3 `optional` makes one-field oneofs
    in_oneof = {f.name for o in oneofs for f in o.fields}
    plain = st.fixed_dictionaries({}, optional={f.name: of(f) for f in descriptor.fields if f.name not in in_oneof})
    chosen = [st.one_of(st.just({}), *[of(f).map(lambda v, n=f.name: {n: v}) for f in o.fields]) for o in oneofs]
    cls = GetMessageClass(descriptor)
    return st.tuples(plain, *chosen).map(lambda parts: cls(**{k: v for part in parts for k, v in part.items()}))


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def wire_bytes(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    numbers = st.one_of(st.sampled_from([f.number for f in descriptor.fields]), st.integers(1, 2 ** 29 - 1))
    payloads = {
        0: st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(2 ** 64, 2 ** 80)).map(varint),  # too wide, too
        1: st.binary(min_size=8, max_size=8), 5: st.binary(min_size=4, max_size=4),
        2: st.one_of(st.binary(max_size=20).map(lambda b: varint(len(b)) + b),  # bad UTF-8 among them
                     st.tuples(st.integers(0, 2 ** 32), st.binary(max_size=4)).map(lambda t: varint(t[0]) + t[1])),
        3: st.just(b""), 4: st.just(b""), 6: st.binary(max_size=3), 7: st.binary(max_size=3),  # groups, no wire type
    }
    record = st.tuples(numbers, st.sampled_from(sorted(payloads))).flatmap(
        lambda nt: payloads[nt[1]].map(lambda p: varint(nt[0] << 3 | nt[1]) + p))
    encoded = messages(descriptor).map(lambda m: m.SerializeToString())
    mutated = st.tuples(encoded, st.integers(0, 2 ** 16), st.integers(0, 255)).map(
        lambda t: t[0][:t[1] % (len(t[0]) + 1)] + bytes([t[2]]) + t[0][t[1] % (len(t[0]) + 1) + 1:])
    cut = st.tuples(encoded, st.integers(0, 2 ** 16)).map(lambda t: t[0][:t[1] % (len(t[0]) + 1)])
    return st.one_of(st.binary(max_size=64), st.lists(record, min_size=1, max_size=6).map(b"".join), mutated, cut)


def near(valid, text: st.SearchStrategy[str] | None = None):
    """Messages like `valid` with one or two of its fields drawn anew (a nested message's, too): requests that get
    past the first checks, to the later ones."""
    text = texts() if text is None else text
    descriptor, cls = valid.DESCRIPTOR, type(valid)

    def anew(f):
        if f.type == F.TYPE_MESSAGE and not f.is_repeated and valid.HasField(f.name):
            return st.one_of(fields(f, text), near(getattr(valid, f.name), text))
        return fields(f, text)

    def build(changes: dict):
        m = cls()
        m.CopyFrom(valid)
        for name, v in changes.items():  # setting a oneof's member clears the others, as a client's would
            m.ClearField(name)
            f = descriptor.fields_by_name[name]
            if f.is_repeated:
                getattr(m, name).extend(v)
            elif f.type == F.TYPE_MESSAGE:
                getattr(m, name).SetInParent()
                getattr(m, name).MergeFrom(v)
            else:
                setattr(m, name, v)
        return m

    names = st.lists(st.sampled_from([f.name for f in descriptor.fields]), min_size=1, max_size=2, unique=True)
    return names.flatmap(lambda ns: st.fixed_dictionaries({n: anew(descriptor.fields_by_name[n]) for n in ns}))\
        .map(build)
