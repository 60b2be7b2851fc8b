//! Python exceptions as pickles, without executing anything.
//!
//! aio-pika's pickle `RPC` answers a failed call with `pickle.dumps(exception)`: a `GLOBAL`
//! naming the exception class, its `args` tuple and a `REDUCE` (plus a `BUILD` with the
//! instance `__dict__` when it has one). kelp's safe pickle reader refuses every class it
//! cannot represent, exceptions included, so this module has its own small reader that runs
//! the data-only part of the pickle machine (protocols 0–5) and keeps a `GLOBAL` as a *name*
//! and a `REDUCE`/`NEWOBJ`/`OBJ`/`INST` as a *record* (class name, arguments, state): nothing
//! is imported or called. Persistent ids, the extension registry and out-of-band buffers are
//! refused. Conversion to JSON is bounded in depth and size, so a small hostile pickle cannot
//! recurse forever or blow up memory through shared references.
//!
//! The writer does the reverse for kelp's own error replies: `PROTO 2`,
//! `GLOBAL builtins\n<Name>\n`, the arguments (JSON-like data only), `TUPLE`, `REDUCE`,
//! `STOP` — what `pickle.loads` turns back into `builtins.<Name>(*args)`.

use serde_json::{Map, Number, Value as Json};

/// Most nesting converted to JSON.
const MAX_DEPTH: usize = 64;

/// A decoded exception: `module.name(*args)`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PyException {
    /// The class's module (`builtins`).
    pub(crate) module: String,
    /// The class's name (`ValueError`).
    pub(crate) name: String,
    /// `exc.args`, as JSON.
    pub(crate) args: Vec<Json>,
}

#[derive(Debug, Clone)]
enum Node {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Set(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global {
        module: String,
        name: String,
    },
    /// `class(*args)` (REDUCE, NEWOBJ, OBJ, INST) with the state `BUILD` gave it.
    Object {
        class: usize,
        args: Vec<usize>,
        state: Option<usize>,
    },
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Mark,
    Obj(usize),
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    heap: Vec<Node>,
    stack: Vec<Slot>,
    memo: std::collections::HashMap<u64, usize>,
}

type R<T> = Result<T, String>;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.input.len())
            .ok_or("pickle truncated")?;
        let s = &self.input[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> R<usize> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_le_bytes([b[0], b[1]])))
    }

    fn u32(&mut self) -> R<usize> {
        let b = self.take(4)?;
        usize::try_from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .map_err(|_| "pickle length too large".to_owned())
    }

    fn u64(&mut self) -> R<usize> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| "pickle length too large".to_owned())
    }

    fn line(&mut self) -> R<&'a str> {
        let rest = &self.input[self.pos..];
        let n = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("pickle line without newline")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "pickle line is not utf-8")?;
        self.pos += n + 1;
        Ok(s.strip_suffix('\r').unwrap_or(s))
    }

    fn push(&mut self, node: Node) {
        self.heap.push(node);
        self.stack.push(Slot::Obj(self.heap.len() - 1));
    }

    fn pop(&mut self) -> R<usize> {
        match self.stack.pop() {
            Some(Slot::Obj(i)) => Ok(i),
            Some(Slot::Mark) => Err("pickle pops a mark as a value".into()),
            None => Err("pickle stack underflow".into()),
        }
    }

    fn top(&self) -> R<usize> {
        match self.stack.last() {
            Some(Slot::Obj(i)) => Ok(*i),
            _ => Err("pickle stack underflow".into()),
        }
    }

    /// Everything above the last mark, mark removed.
    fn pop_mark(&mut self) -> R<Vec<usize>> {
        let at = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or("pickle has no mark")?;
        let items = self
            .stack
            .drain(at..)
            .skip(1)
            .map(|s| match s {
                Slot::Obj(i) => Ok(i),
                Slot::Mark => Err("pickle mark inside a mark".to_owned()),
            })
            .collect::<R<Vec<_>>>()?;
        Ok(items)
    }

    fn memo_put(&mut self, key: u64) -> R<()> {
        let i = self.top()?;
        self.memo.insert(key, i);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> R<()> {
        let i = *self.memo.get(&key).ok_or("pickle memo key missing")?;
        self.stack.push(Slot::Obj(i));
        Ok(())
    }

    fn tuple_items(&self, i: usize) -> R<Vec<usize>> {
        match &self.heap[i] {
            Node::Tuple(v) | Node::List(v) => Ok(v.clone()),
            _ => Err("pickle call arguments are not a tuple".into()),
        }
    }

    fn append(&mut self, list: usize, items: Vec<usize>) -> R<()> {
        match &mut self.heap[list] {
            Node::List(v) | Node::Set(v) => {
                v.extend(items);
                Ok(())
            }
            _ => Err("pickle appends to something that is not a list".into()),
        }
    }

    fn set_items(&mut self, dict: usize, items: Vec<usize>) -> R<()> {
        if items.len() % 2 != 0 {
            return Err("pickle SETITEMS with an odd number of items".into());
        }
        let pairs: Vec<(usize, usize)> = items.chunks(2).map(|c| (c[0], c[1])).collect();
        match &mut self.heap[dict] {
            Node::Dict(v) => {
                v.extend(pairs);
                Ok(())
            }
            // `BUILD`-less object state set through SETITEMS is not a thing; refuse.
            _ => Err("pickle sets items on something that is not a dict".into()),
        }
    }

    fn run(&mut self) -> R<usize> {
        loop {
            let op = self.byte()?;
            match op {
                0x80 => {
                    self.byte()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack.pop().ok_or("pickle stack underflow")?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let i = self.top()?;
                    self.stack.push(Slot::Obj(i));
                }
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                b'I' => {
                    let l = self.line()?;
                    let n = match l {
                        "01" => Node::Bool(true),
                        "00" => Node::Bool(false),
                        _ => Node::Int(l.trim().parse().map_err(|_| "pickle INT is bad")?),
                    };
                    self.push(n);
                }
                b'L' => {
                    let l = self.line()?;
                    let l = l.trim().trim_end_matches('L');
                    self.push(Node::Int(l.parse().map_err(|_| "pickle LONG is bad")?));
                }
                b'J' => {
                    let b = self.take(4)?;
                    self.push(Node::Int(i128::from(i32::from_le_bytes([
                        b[0], b[1], b[2], b[3],
                    ]))));
                }
                b'K' => {
                    let b = self.byte()?;
                    self.push(Node::Int(i128::from(b)));
                }
                b'M' => {
                    let n = self.u16()?;
                    self.push(Node::Int(n as i128));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        usize::from(self.byte()?)
                    } else {
                        self.u32()?
                    };
                    let b = self.take(n)?;
                    self.push(Node::Int(long_le(b)?));
                }
                b'F' => {
                    let l = self.line()?;
                    self.push(Node::Float(
                        l.trim().parse().map_err(|_| "pickle FLOAT is bad")?,
                    ));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Node::Float(f64::from_be_bytes(a)));
                }
                b'S' => {
                    let l = self.line()?;
                    let s = l
                        .strip_prefix(['\'', '"'])
                        .and_then(|s| s.strip_suffix(['\'', '"']))
                        .unwrap_or(l);
                    self.push(Node::Str(s.to_owned()));
                }
                b'V' => {
                    let l = self.line()?;
                    self.push(Node::Str(raw_unicode_unescape(l)));
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'U' | b'C' => usize::from(self.byte()?),
                        b'T' | b'B' => self.u32()?,
                        _ => self.u64()?,
                    };
                    let b = self.take(n)?.to_vec();
                    // Python 2 strings (`T`, `U`) come back as text when they are text.
                    let node = match op {
                        b'T' | b'U' => match String::from_utf8(b) {
                            Ok(s) => Node::Str(s),
                            Err(e) => Node::Bytes(e.into_bytes()),
                        },
                        _ => Node::Bytes(b),
                    };
                    self.push(node);
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => usize::from(self.byte()?),
                        b'X' => self.u32()?,
                        _ => self.u64()?,
                    };
                    let b = self.take(n)?;
                    let s = String::from_utf8_lossy(b).into_owned();
                    self.push(Node::Str(s));
                }
                b')' => self.push(Node::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items));
                }
                b']' => self.push(Node::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items));
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.append(list, vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.append(list, items)?;
                }
                b'}' => self.push(Node::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Dict(Vec::new()));
                    let d = self.top()?;
                    self.set_items(d, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?;
                    self.set_items(d, items)?;
                }
                0x8f => self.push(Node::Set(Vec::new())),
                0x90 => {
                    let items = self.pop_mark()?;
                    let s = self.top()?;
                    self.append(s, items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Node::Set(items));
                }
                b'c' => {
                    let module = self.line()?.to_owned();
                    let name = self.line()?.to_owned();
                    self.push(Node::Global { module, name });
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.heap[module], &self.heap[name]) {
                        (Node::Str(m), Node::Str(n)) => {
                            let g = Node::Global {
                                module: m.clone(),
                                name: n.clone(),
                            };
                            self.push(g);
                        }
                        _ => return Err("pickle STACK_GLOBAL arguments are not strings".into()),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let args = self.tuple_items(args)?;
                    self.push(Node::Object {
                        class,
                        args,
                        state: None,
                    });
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let args = self.tuple_items(args)?;
                    self.push(Node::Object {
                        class,
                        args,
                        state: None,
                    });
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err("pickle OBJ without a class".into());
                    }
                    let class = items.remove(0);
                    self.push(Node::Object {
                        class,
                        args: items,
                        state: None,
                    });
                }
                b'i' => {
                    let module = self.line()?.to_owned();
                    let name = self.line()?.to_owned();
                    let args = self.pop_mark()?;
                    self.push(Node::Global { module, name });
                    let class = self.pop()?;
                    self.push(Node::Object {
                        class,
                        args,
                        state: None,
                    });
                }
                b'b' => {
                    let st = self.pop()?;
                    let obj = self.top()?;
                    if let Node::Object { state, .. } = &mut self.heap[obj] {
                        *state = Some(st);
                    }
                }
                b'p' => {
                    let key = self.line()?.trim().parse().map_err(|_| "pickle PUT is bad")?;
                    self.memo_put(key)?;
                }
                b'q' => {
                    let key = u64::from(self.byte()?);
                    self.memo_put(key)?;
                }
                b'r' => {
                    let key = self.u32()? as u64;
                    self.memo_put(key)?;
                }
                0x94 => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?;
                }
                b'g' => {
                    let key = self.line()?.trim().parse().map_err(|_| "pickle GET is bad")?;
                    self.memo_get(key)?;
                }
                b'h' => {
                    let key = u64::from(self.byte()?);
                    self.memo_get(key)?;
                }
                b'j' => {
                    let key = self.u32()? as u64;
                    self.memo_get(key)?;
                }
                other => {
                    return Err(format!(
                        "pickle opcode 0x{other:02x} is not supported (persistent ids, extensions and buffers are refused)"
                    ))
                }
            }
        }
    }
}

/// A little-endian two's-complement integer (`LONG1` / `LONG4`).
fn long_le(b: &[u8]) -> R<i128> {
    if b.is_empty() {
        return Ok(0);
    }
    if b.len() > 16 {
        return Err("pickle integer wider than 128 bits".into());
    }
    let neg = b[b.len() - 1] & 0x80 != 0;
    let mut a = if neg { [0xffu8; 16] } else { [0u8; 16] };
    a[..b.len()].copy_from_slice(b);
    Ok(i128::from_le_bytes(a))
}

/// Python's `raw-unicode-escape` (protocol 0 `UNICODE`): `\uXXXX` and `\UXXXXXXXX`.
fn raw_unicode_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && matches!(chars.peek(), Some('u' | 'U')) {
            let width = if chars.next() == Some('u') { 4 } else { 8 };
            let hex: String = chars.by_ref().take(width).collect();
            match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                Some(ch) => out.push(ch),
                None => {
                    out.push('\\');
                    out.push_str(&hex);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

struct Convert<'h> {
    heap: &'h [Node],
    budget: usize,
}

impl Convert<'_> {
    fn json(&mut self, i: usize, depth: usize) -> R<Json> {
        if depth > MAX_DEPTH {
            return Err("pickle nests too deep".into());
        }
        self.budget = self
            .budget
            .checked_sub(1)
            .ok_or("pickle expands too much")?;
        Ok(match &self.heap[i] {
            Node::None => Json::Null,
            Node::Bool(b) => Json::Bool(*b),
            Node::Int(n) => int_json(*n),
            Node::Float(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
            Node::Str(s) => Json::String(s.clone()),
            Node::Bytes(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
            Node::List(v) | Node::Tuple(v) | Node::Set(v) => Json::Array(
                v.iter()
                    .map(|i| self.json(*i, depth + 1))
                    .collect::<R<_>>()?,
            ),
            Node::Dict(pairs) => {
                let mut m = Map::new();
                for (k, v) in pairs {
                    let key = match self.json(*k, depth + 1)? {
                        Json::String(s) => s,
                        other => other.to_string(),
                    };
                    let value = self.json(*v, depth + 1)?;
                    m.insert(key, value);
                }
                Json::Object(m)
            }
            Node::Global { module, name } => Json::String(format!("{module}.{name}")),
            Node::Object { class, args, state } => {
                let mut m = Map::new();
                m.insert("__class__".into(), self.json(*class, depth + 1)?);
                let args = args
                    .iter()
                    .map(|i| self.json(*i, depth + 1))
                    .collect::<R<Vec<_>>>()?;
                m.insert("args".into(), Json::Array(args));
                if let Some(s) = state {
                    m.insert("state".into(), self.json(*s, depth + 1)?);
                }
                Json::Object(m)
            }
        })
    }
}

fn int_json(n: i128) -> Json {
    if let Ok(v) = i64::try_from(n) {
        Json::from(v)
    } else if let Ok(v) = u64::try_from(n) {
        Json::from(v)
    } else {
        Json::String(n.to_string())
    }
}

/// Read a pickled exception: `Ok(Some(..))` when the pickle is `class(*args)` (an exception
/// or any other reduced object), `Ok(None)` when it is plain data.
pub(crate) fn read_exception(input: &[u8]) -> Result<Option<PyException>, String> {
    let mut m = Machine {
        input,
        pos: 0,
        heap: Vec::new(),
        stack: Vec::new(),
        memo: std::collections::HashMap::new(),
    };
    let top = m.run()?;
    let Node::Object { class, args, .. } = &m.heap[top] else {
        return Ok(None);
    };
    let Node::Global { module, name } = &m.heap[*class] else {
        return Ok(None);
    };
    let mut conv = Convert {
        heap: &m.heap,
        budget: 10_000 + input.len().saturating_mul(16),
    };
    let args = args
        .iter()
        .map(|i| conv.json(*i, 0))
        .collect::<R<Vec<_>>>()?;
    Ok(Some(PyException {
        module: module.clone(),
        name: name.clone(),
        args,
    }))
}

/// Python's built-in exception classes, which every Python can unpickle as `builtins.<name>`.
pub(crate) const BUILTIN_EXCEPTIONS: &[&str] = &[
    "ArithmeticError",
    "AssertionError",
    "AttributeError",
    "BaseException",
    "BufferError",
    "ConnectionError",
    "EOFError",
    "Exception",
    "FileExistsError",
    "FileNotFoundError",
    "FloatingPointError",
    "ImportError",
    "IndexError",
    "KeyError",
    "LookupError",
    "MemoryError",
    "ModuleNotFoundError",
    "NameError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "PermissionError",
    "RecursionError",
    "ReferenceError",
    "RuntimeError",
    "StopIteration",
    "TimeoutError",
    "TypeError",
    "UnicodeError",
    "ValueError",
    "ZeroDivisionError",
];

/// `pickle.dumps(builtins.<name>(*args), protocol=2)` for JSON-like arguments.
pub(crate) fn write_exception(name: &str, args: &[Json]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"\x80\x02c");
    out.extend_from_slice(b"builtins\n");
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    out.push(b'(');
    for a in args {
        write_value(&mut out, a, 0);
    }
    out.extend_from_slice(b"tR.");
    out
}

fn write_value(out: &mut Vec<u8>, v: &Json, depth: usize) {
    if depth > MAX_DEPTH {
        out.push(b'N');
        return;
    }
    match v {
        Json::Null => out.push(b'N'),
        Json::Bool(true) => out.push(0x88),
        Json::Bool(false) => out.push(0x89),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                write_int(out, i128::from(i));
            } else if let Some(u) = n.as_u64() {
                write_int(out, i128::from(u));
            } else {
                out.push(b'G');
                out.extend_from_slice(&n.as_f64().unwrap_or(f64::NAN).to_be_bytes());
            }
        }
        Json::String(s) => {
            out.push(b'X');
            out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Json::Array(items) => {
            out.extend_from_slice(b"](");
            for i in items {
                write_value(out, i, depth + 1);
            }
            out.push(b'e');
        }
        Json::Object(map) => {
            out.extend_from_slice(b"}(");
            for (k, v) in map {
                write_value(out, &Json::String(k.clone()), depth + 1);
                write_value(out, v, depth + 1);
            }
            out.push(b'u');
        }
    }
}

fn write_int(out: &mut Vec<u8>, n: i128) {
    if let Ok(small) = i32::try_from(n) {
        out.push(b'J');
        out.extend_from_slice(&small.to_le_bytes());
        return;
    }
    // LONG1: minimal little-endian two's complement.
    let bytes = n.to_le_bytes();
    let mut len = 16;
    while len > 1 {
        let last = bytes[len - 1];
        let prev_sign = bytes[len - 2] & 0x80;
        if (last == 0 && prev_sign == 0) || (last == 0xff && prev_sign != 0) {
            len -= 1;
        } else {
            break;
        }
    }
    out.push(0x8a);
    out.push(len as u8);
    out.extend_from_slice(&bytes[..len]);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_protocol_4_exception() {
        // pickle.dumps(ValueError('bad', 1, {'a': [1, 2]}))  (Python 3.11, protocol 4)
        let p = b"\x80\x04\x95\x36\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\nValueError\x94\x93\x94\x8c\x03bad\x94K\x01}\x94\x8c\x01a\x94]\x94(K\x01K\x02es\x87\x94R\x94.";
        let e = read_exception(p).unwrap().unwrap();
        assert_eq!(
            (e.module.as_str(), e.name.as_str()),
            ("builtins", "ValueError")
        );
        assert_eq!(e.args, vec![json!("bad"), json!(1), json!({"a": [1, 2]})]);
    }

    #[test]
    fn reads_exception_with_state() {
        // e = KeyError('k'); e.note = 'x'; pickle.dumps(e)
        let p = b"\x80\x04\x95\x30\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x08KeyError\x94\x93\x94\x8c\x01k\x94\x85\x94R\x94}\x94\x8c\x04note\x94\x8c\x01x\x94sb.";
        let e = read_exception(p).unwrap().unwrap();
        assert_eq!(e.name, "KeyError");
        assert_eq!(e.args, vec![json!("k")]);
    }

    #[test]
    fn plain_data_is_not_an_exception() {
        // pickle.dumps({'a': 1}, protocol=2)
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s.";
        assert_eq!(read_exception(p).unwrap(), None);
    }

    #[test]
    fn round_trips_its_own_writer() {
        let args = vec![
            json!("bad input"),
            json!(42),
            json!(-7),
            json!(1u64 << 40),
            json!(-(1i64 << 40)),
            json!(u64::MAX),
            json!(1.5),
            json!(null),
            json!(true),
            json!([1, "x", [false]]),
            json!({"k": {"n": 1}}),
        ];
        let p = write_exception("ValueError", &args);
        let e = read_exception(&p).unwrap().unwrap();
        assert_eq!(e.name, "ValueError");
        assert_eq!(e.args, args);
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        for p in [
            &b""[..],
            b"\x80",
            b"(((((",
            b"R.",
            b"\x80\x04\x95",
            b"h\x05.",
            b"cos\nsystem\n(S'ls'\ntR",
            b"\x8a\xff",
            b"P1\n.",
        ] {
            assert!(read_exception(p).is_err(), "{p:?}");
        }
        // The classic os.system payload is read as a *record*, never run.
        let e = read_exception(b"cos\nsystem\n(S'ls'\ntR.")
            .unwrap()
            .unwrap();
        assert_eq!((e.module.as_str(), e.name.as_str()), ("os", "system"));
        // A list that contains itself, shared many times: bounded.
        let mut p = b"]q\x00(".to_vec();
        for _ in 0..50 {
            p.extend_from_slice(b"h\x00");
        }
        p.extend_from_slice(b"e0cbuiltins\nValueError\n(h\x00tR.");
        assert!(read_exception(&p).is_err());
    }
}
