"""XML-RPC codec that speaks the Incutio IXR dialect OPNsense uses, byte for byte.

Encoding reproduces IXR's exact layout (newlines and two-space member indentation) so that a
request or response we produce is indistinguishable from one made by OPNsense's PHP. Decoding
is strict and bounded: it goes through `xmlsafe` (no DTD, no entities, libxml2 depth limit) and
turns every malformed body into `XmlRpcDecodeError` instead of an exception trace.

Type mapping (PHP -> wire -> Python):
  string <-> <string> <-> str; int <-> <int>/<i4> <-> int; bool <-> <boolean> <-> bool;
  float <-> <double> <-> float; list (and an empty dict: PHP's empty array) <-> <array>;
  dict <-> <struct>; bytes <-> <base64>.
An untyped ``<value>text</value>`` decodes to a string; an untyped value with only whitespace
carries no value at all (IXR drops it from its array or struct).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import datetime
from sys import intern
from typing import Any

from lxml import etree

from hasync.core import xmlsafe

# IXR fault codes (reference §2).
PARSE_ERROR = -32700
NOT_METHOD_CALL = -32600
UNKNOWN_METHOD = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

INT_MIN, INT_MAX = -(2**63), 2**63 - 1

# The reply OPNsense's xmlrpc.php sends on a failed login: HTTP 200, untyped value, not a fault.
AUTH_FAILED_TEXT = "Authentication failed"
AUTH_FAILED_RESPONSE = (
    b'<?xml version="1.0"?>\n<methodResponse>\n<params>\n    <param>\n'
    b"      <value>Authentication failed</value>\n    </param>\n  </params>\n</methodResponse>\n\n"
)

_INT_TEXT = re.compile(r"[+-]?[0-9]+")
# the spec's double: optional sign, ASCII digits, one optional point (float() would also take
# "nan", "inf", "1_0" and non-ASCII digits); an exponent is accepted as PHP's parser does
_DOUBLE_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_XML_INVALID_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class XmlRpcDecodeError(ValueError):
    """A body that is not a valid XML-RPC message; `code` is the IXR fault code to answer with."""

    def __init__(self, message: str, code: int = PARSE_ERROR) -> None:
        super().__init__(message)
        self.code = code


class Fault(Exception):
    """An XML-RPC fault a peer answered (code and message as PHP's IXR sends them)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"fault {self.code}: {self.message}"


_NEEDS_ESCAPE = re.compile("[&<>\"']")


def _escape(text: str) -> str:
    """PHP htmlspecialchars() with ENT_QUOTES, as IXR applies it to strings."""
    # printable text holds no XML-invalid character; most config text needs no escaping at all
    if not text.isprintable() and _XML_INVALID_CHARS.search(text):
        raise ValueError("string contains characters that XML 1.0 cannot carry")
    if _NEEDS_ESCAPE.search(text) is None:
        return text
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#039;")
    )


def encode_value(value: Any) -> str:
    """The XML of one value, laid out exactly as IXR_Value::getXml() does."""
    out: list[str] = []
    _encode_into(value, out)
    return "".join(out)


def _encode_into(value: Any, out: list[str]) -> None:
    """`encode_value` appending to one list: no per-level join of a 100 MB payload."""
    kind = type(value)
    if kind is str:
        out.append("<string>")
        out.append(_escape(value))
        out.append("</string>")
    elif kind is dict and value:
        append = out.append
        append("<struct>\n")
        for name, item in value.items():
            append("  <member><name>")
            append(_escape(name if type(name) is str else str(name)))
            append("</name><value>")
            _encode_into(item, out)
            append("</value></member>\n")
        append("</struct>")
    elif kind is list:
        append = out.append
        append("<array><data>\n")
        for item in value:
            append("  <value>")
            _encode_into(item, out)
            append("</value>\n")
        append("</data></array>")
    else:
        out.append(_encode_other(value))


def _encode_other(value: Any) -> str:
    if isinstance(value, bool):
        return f"<boolean>{1 if value else 0}</boolean>"
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise ValueError(f"integer {value} does not fit XML-RPC's 64-bit range")
        return f"<int>{value}</int>"
    if isinstance(value, float):
        return f"<double>{value!r}</double>"
    if isinstance(value, str):
        return f"<string>{_escape(value)}</string>"
    if isinstance(value, bytes):
        return f"<base64>{base64.b64encode(value).decode('ascii')}</base64>"
    if isinstance(value, datetime):
        return f"<dateTime.iso8601>{value.strftime('%Y%m%dT%H:%M:%S')}</dateTime.iso8601>"
    if isinstance(value, dict) and value:
        parts = ["<struct>\n"]
        for name, item in value.items():
            parts.append(f"  <member><name>{_escape(str(name))}</name><value>")
            parts.append(encode_value(item))
            parts.append("</value></member>\n")
        parts.append("</struct>")
        return "".join(parts)
    if isinstance(value, (list, tuple, dict)):
        parts = ["<array><data>\n"]
        for item in value:
            parts.append("  <value>")
            parts.append(encode_value(item))
            parts.append("</value>\n")
        parts.append("</data></array>")
        return "".join(parts)
    if value is None:
        return "<string></string>"
    raise TypeError(f"cannot encode {type(value).__name__} as XML-RPC")


def dumps_request(method: str, params: list[Any] | tuple[Any, ...]) -> bytes:
    """A methodCall exactly as IXR_Request builds it."""
    out = [f'<?xml version="1.0"?>\n<methodCall>\n<methodName>{_escape(method)}</methodName>\n<params>\n']
    for param in params:
        out.append("<param><value>")
        _encode_into(param, out)
        out.append("</value></param>\n")
    out.append("</params></methodCall>")
    return "".join(out).encode("utf-8")


def dumps_response(value: Any) -> bytes:
    """A methodResponse exactly as IXR_Server::serve() wraps a result."""
    body = (
        '<?xml version="1.0"?>\n<methodResponse>\n  <params>\n    <param>\n      <value>\n      '
        f"{encode_value(value)}\n      </value>\n    </param>\n  </params>\n</methodResponse>\n"
    )
    return body.encode("utf-8")


def dumps_fault(code: int, message: str) -> bytes:
    """A fault exactly as IXR_Error::getXml() lays it out."""
    body = (
        '<?xml version="1.0"?>\n<methodResponse>\n  <fault>\n    <value>\n      <struct>\n'
        "        <member>\n          <name>faultCode</name>\n"
        f"          <value><int>{int(code)}</int></value>\n        </member>\n"
        "        <member>\n          <name>faultString</name>\n"
        f"          <value><string>{_escape(message)}</string></value>\n        </member>\n"
        "      </struct>\n    </value>\n  </fault>\n</methodResponse>\n"
    )
    return body.encode("utf-8")


# --- decoding -------------------------------------------------------------------------------

_NO_VALUE = object()

# Bytes of a request parsed between two looks at its growing tree (`loads_request`).
FEED = 1024 * 1024

# What the finished parts of a request's structs and arrays decoded to while it was parsed, by
# the <struct> or <data> element they left (`_collapse`); `_decode_struct` and `_decode_array`
# go on from there. Set for one `loads_request` (per thread and context).
_DECODED: ContextVar[dict[etree._Element, Any] | None] = ContextVar("hasync_xmlrpc_decoded", default=None)

# A request's short string values, each kept once for the request (`loads_request` sets it, like
# `_DECODED`): a config's payload repeats tens of thousands of them ("pass", "inet", "lan",
# "any", ...) hundreds of thousands of times; at 20 MB ~4 MB less while the merge runs.
_SHORT: ContextVar[dict[str, str] | None] = ContextVar("hasync_xmlrpc_short", default=None)
SHORT = 16


def _parse(body: bytes) -> etree._Element:
    try:
        return xmlsafe.parse_bytes(body, remove_blank_text=False)
    except (etree.XMLSyntaxError, xmlsafe.UnsafeXmlError) as exc:
        raise XmlRpcDecodeError(f"parse error. not well formed ({exc})") from None


def _children(node: etree._Element) -> list[etree._Element]:
    return [child for child in node if isinstance(child.tag, str)]


def _decode_value(node: etree._Element) -> Any:
    """Decode a <value> element; returns _NO_VALUE for IXR's 'carries no value' case.

    The shapes that make up nearly every body (a lone <string>, <struct> or <array>, members of
    exactly <name><value>) are read directly; anything else, including every malformed body,
    goes through `_decode_value_general`, which defines the behaviour.
    """
    count = len(node)
    if count == 1:
        typed = node[0]
        kind = typed.tag
        if kind == "string":
            if len(typed) == 0:
                text = typed.text
                if text is None:
                    return ""
                shared = _SHORT.get()
                return shared.setdefault(text, text) if shared is not None and len(text) <= SHORT else text
        elif kind == "struct":
            return _decode_struct(typed)
        elif kind == "array":
            return _decode_array(typed)
    elif count == 0:
        text = node.text or ""
        return text if text.strip() != "" else _NO_VALUE
    return _decode_value_general(node)


def _decode_struct(typed: etree._Element) -> dict[str, Any]:
    decoded = _DECODED.get()
    result: dict[str, Any] = (decoded.pop(typed, None) if decoded else None) or {}
    for member in typed:
        _decode_member(member, result)
    return result


def _decode_member(member: etree._Element, result: dict[str, Any]) -> None:
    """One child of a <struct> into `result` (a comment or PI adds nothing).

    The member's name is interned: a config's payload repeats a few hundred tag names some
    400,000 times at 20 MB, and one string per name instead of one per member is ~30 MB less
    in the agent while a stock primary's request waits for the merge."""
    tag = member.tag
    if tag != "member":
        if isinstance(tag, str):
            raise XmlRpcDecodeError(f"unexpected <{tag}> in <struct>")
        return
    if len(member) == 2:
        name, value = member[0], member[1]
        if name.tag == "name" and value.tag == "value":
            item = _decode_value(value)
            if item is not _NO_VALUE:
                result[intern(name.text or "")] = item
            return
    parts = _children(member)
    names = [p for p in parts if p.tag == "name"]
    values = [p for p in parts if p.tag == "value"]
    if len(names) != 1 or len(values) != 1 or len(parts) != 2:
        raise XmlRpcDecodeError("<member> must hold one <name> and one <value>")
    item = _decode_value(values[0])
    if item is not _NO_VALUE:
        result[intern(names[0].text or "")] = item


def _decode_array(typed: etree._Element) -> list[Any]:
    if len(typed) == 1 and typed[0].tag == "data":
        data = typed[0]
    else:
        found = _children(typed)
        if len(found) != 1 or found[0].tag != "data":
            raise XmlRpcDecodeError("<array> must hold exactly one <data>")
        data = found[0]
    decoded = _DECODED.get()
    items: list[Any] = (decoded.pop(data, None) if decoded else None) or []
    for child in data:
        _decode_item(child, items)
    return items


def _decode_item(child: etree._Element, items: list[Any]) -> None:
    """One child of an array's <data> onto `items` (a comment or PI adds nothing)."""
    tag = child.tag
    if tag == "value":
        item = _decode_value(child)
        if item is not _NO_VALUE:
            items.append(item)
    elif isinstance(tag, str):
        raise XmlRpcDecodeError(f"unexpected <{tag}> in <data>")


def _decode_value_general(node: etree._Element) -> Any:
    kids = _children(node)
    if not kids:
        text = node.text or ""
        return text if text.strip() != "" else _NO_VALUE
    if len(kids) != 1:
        raise XmlRpcDecodeError("a <value> holds more than one typed element")
    typed = kids[0]
    kind = typed.tag
    text = typed.text or ""
    if kind == "string":
        if _children(typed):
            raise XmlRpcDecodeError("<string> must not contain elements")
        return text
    if kind in ("int", "i4", "i8"):
        try:
            if not _INT_TEXT.fullmatch(text.strip()):  # int() also takes "1_000" and non-ASCII digits
                raise ValueError(text)
            number = int(text.strip())
        except ValueError:
            raise XmlRpcDecodeError(f"<{kind}> holds no integer: {text[:40]!r}") from None
        if not INT_MIN <= number <= INT_MAX:
            raise XmlRpcDecodeError(f"<{kind}> {text[:40]}... is outside the 64-bit range")
        return number
    if kind == "boolean":
        if text.strip() not in ("0", "1"):
            raise XmlRpcDecodeError(f"<boolean> must be 0 or 1, got {text[:20]!r}")
        return text.strip() == "1"
    if kind == "double":
        if not _DOUBLE_TEXT.fullmatch(text.strip()):
            raise XmlRpcDecodeError(f"<double> holds no number: {text[:40]!r}")
        number_f = float(text.strip())
        if not math.isfinite(number_f):
            raise XmlRpcDecodeError(f"<double> {text[:40]!r} is out of range")
        return number_f
    if kind == "base64":
        try:  # (from the text itself: an ASCII copy of it would be 8 MB more for a fast path's chunk)
            return binascii.a2b_base64(text)
        except ValueError:  # (binascii.Error too; and a non-ASCII text)
            raise XmlRpcDecodeError("<base64> is not valid base64") from None
    if kind == "dateTime.iso8601":
        try:
            return datetime.strptime(text.strip(), "%Y%m%dT%H:%M:%S")
        except ValueError:
            raise XmlRpcDecodeError(f"bad dateTime.iso8601 {text[:40]!r}") from None
    if kind == "nil":
        return None
    if kind == "array":
        return _decode_array(typed)
    if kind == "struct":
        return _decode_struct(typed)
    raise XmlRpcDecodeError(f"unknown XML-RPC type <{kind}>")


def _decode_params(params: etree._Element | None) -> list[Any]:
    if params is None:
        return []
    out = []
    for param in _children(params):
        if param.tag != "param":
            raise XmlRpcDecodeError(f"unexpected <{param.tag}> in <params>")
        values = _children(param)
        if len(values) != 1 or values[0].tag != "value":
            raise XmlRpcDecodeError("<param> must hold exactly one <value>")
        item = _decode_value(values[0])
        if item is not _NO_VALUE:
            out.append(item)
    return out


def loads_request(body: bytes | Iterable[bytes]) -> tuple[str, list[Any]]:
    """Decode a methodCall into (method name, params).

    `body` is the request's bytes, or its pieces as they arrive (the agent feeds the parser
    from the socket, so a large body is never held whole).

    The body is parsed a piece at a time (`FEED`), and after each piece the finished parts of
    the structs and arrays being read are decoded and dropped from the tree (`_collapse`): the
    tree holds little more than a piece, where a stock primary's 41 MB request for a 20 MB
    config parsed whole took ~400 MB. The result, and the error a bad body gets, are the whole
    tree's decode's: the parts go through the very same code, a part that fails stops the
    collapsing, and the decode at the end, which reads the parts already done, meets that
    failure again after whatever it checks first.
    """
    decoded: dict[etree._Element, Any] = {}
    token, shorts = _DECODED.set(decoded), _SHORT.set({})
    try:
        return _request_of(_parse_collapsing(body, decoded))
    finally:
        _DECODED.reset(token)
        _SHORT.reset(shorts)


def _parse_collapsing(body: bytes | Iterable[bytes], decoded: dict[etree._Element, Any]) -> etree._Element:
    parser = xmlsafe.pull_parser("methodCall", remove_blank_text=False)
    top: etree._Element | None = None
    collapsing = True
    pieces = (body[start:start + FEED] for start in range(0, len(body), FEED)) if isinstance(body, bytes) else body
    try:
        for piece in pieces:
            parser.feed(piece)
            # only <methodCall> starts are reported: the first is the root's, if the root is
            # one (if not, the request is refused once parsed, whatever was collapsed)
            for _event, element in parser.read_events():
                if top is None and isinstance(element, etree._Element):
                    top = element
            if top is not None and collapsing:
                try:
                    _collapse(top, decoded)
                except (XmlRpcDecodeError, RecursionError):
                    collapsing = False  # the decode at the end meets it again, in its own order
        root = parser.close()
        xmlsafe.refuse_dtd(root)
    except (etree.XMLSyntaxError, xmlsafe.UnsafeXmlError) as exc:
        raise XmlRpcDecodeError(f"parse error. not well formed ({exc})") from None
    return root


def _collapse(node: etree._Element, decoded: dict[etree._Element, Any]) -> None:
    """Decode and drop the finished children of every <struct> and <data> on the tree's growing
    edge (all but the last: the parser has moved past them), keeping what they decode to in
    `decoded` by the element they left, for `_decode_struct` and `_decode_array` to go on from."""
    while len(node):
        tag = node.tag
        if tag == "struct" or tag == "data":
            finished = list(node)[:-1]
            if finished:
                if tag == "struct":
                    members = decoded.setdefault(node, {})
                    for member in finished:
                        _decode_member(member, members)
                        node.remove(member)
                else:
                    items = decoded.setdefault(node, [])
                    for child in finished:
                        _decode_item(child, items)
                        node.remove(child)
        node = node[-1]


def _request_of(root: etree._Element) -> tuple[str, list[Any]]:
    if root.tag != "methodCall":
        raise XmlRpcDecodeError("server error. invalid xml-rpc. not conforming to spec. "
                                "Request must be a methodCall", NOT_METHOD_CALL)
    name_node = root.find("methodName")
    if name_node is None or not (name_node.text or "").strip():
        raise XmlRpcDecodeError("methodCall has no methodName", NOT_METHOD_CALL)
    try:
        params = _decode_params(root.find("params"))
    except RecursionError:
        raise XmlRpcDecodeError("parse error. not well formed (nesting too deep)") from None
    return name_node.text.strip() if name_node.text else "", params


def multicall_entry(entry: Any) -> Any:
    """One result of a `system.multicall` reply: the call's value (it travels as a one-element
    array), or `Fault` raised for the struct a failed call answers with instead (IXR answers
    each call of a multicall on its own). Anything else raises `XmlRpcDecodeError`."""
    if isinstance(entry, list) and len(entry) == 1:
        return entry[0]
    if isinstance(entry, dict) and "faultCode" in entry:
        code = entry["faultCode"]
        raise Fault(code if isinstance(code, int) else 0, str(entry.get("faultString", "")))
    raise XmlRpcDecodeError(f"not a system.multicall result: {str(entry)[:80]!r}")


def loads_response(body: bytes) -> Any:
    """Decode a methodResponse; raises `Fault` for a fault reply."""
    root = _parse(body)
    if root.tag != "methodResponse":
        raise XmlRpcDecodeError(f"expected a methodResponse, got <{root.tag}>")
    fault = root.find("fault")
    if fault is not None:
        value_node = fault.find("value")
        decoded = _decode_value(value_node) if value_node is not None else {}
        if not isinstance(decoded, dict):
            raise XmlRpcDecodeError("fault without a struct")
        code = decoded.get("faultCode", 0)
        raise Fault(int(code) if isinstance(code, int) else 0, str(decoded.get("faultString", "")))
    params = _decode_params(root.find("params"))
    if len(params) != 1:
        raise XmlRpcDecodeError(f"methodResponse must carry one value, got {len(params)}")
    return params[0]
