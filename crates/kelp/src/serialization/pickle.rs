//! A safe pickle reader (protocols 0–5) that builds a [`Value`] and never executes anything.
//!
//! Pickle is a program for a stack machine whose `GLOBAL`/`REDUCE`/`NEWOBJ`/`BUILD` opcodes
//! import and call arbitrary Python callables. This reader runs the data-only part of that
//! machine and recognises a short allow-list of callables whose effect it can reproduce as plain
//! data:
//!
//! | pickled callable | result |
//! |---|---|
//! | `builtins.set` / `frozenset` / `list` / `tuple` | [`Value::List`] |
//! | `builtins.dict`, `collections.OrderedDict` | [`Value::Map`] |
//! | `builtins.bytes` / `bytearray`, `_codecs.encode(s, "latin1")` | [`Value::Bytes`] |
//! | `datetime.datetime` / `date` / `time` (with `datetime.timezone` offsets) | ISO 8601 [`Value::String`] |
//! | `datetime.timedelta` | [`Value::Float`] seconds |
//! | `decimal.Decimal` | [`Value::String`] (`"1.50"`) |
//! | `uuid.UUID` | [`Value::String`] (hyphenated lowercase hex) |
//!
//! Any other global (a class instance, a function, `os.system`…) makes decoding fail with an
//! error that names it. Persistent IDs, the extension registry and out-of-band buffers are
//! rejected too. Nesting deeper than [`MAX_DEPTH`] and expansions of shared (memoised) objects
//! beyond a budget proportional to the input are rejected, so a small hostile pickle can neither
//! overflow the stack nor blow up memory.

use super::value::Value;

/// Maximum nesting depth of the decoded value.
pub(crate) const MAX_DEPTH: usize = 128;

/// Everything the reader can fail with; turned into `SerializationError::Decode` by the caller.
pub(crate) type Error = String;
type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Set,
    List,
    Tuple,
    Dict,
    OrderedDict,
    Bytes,
    Bytearray,
    CodecsEncode,
    Reconstructor,
    Object,
    Datetime,
    Date,
    Time,
    Timedelta,
    Timezone,
    Decimal,
    Uuid,
}

fn known_global(module: &str, name: &str) -> Option<Known> {
    Some(match (module, name) {
        ("builtins" | "__builtin__", "set" | "frozenset") => Known::Set,
        ("builtins" | "__builtin__", "list") => Known::List,
        ("builtins" | "__builtin__", "tuple") => Known::Tuple,
        ("builtins" | "__builtin__", "dict") => Known::Dict,
        ("builtins" | "__builtin__", "bytes") => Known::Bytes,
        ("builtins" | "__builtin__", "bytearray") => Known::Bytearray,
        ("builtins" | "__builtin__", "object") => Known::Object,
        ("collections", "OrderedDict") => Known::OrderedDict,
        ("_codecs", "encode") => Known::CodecsEncode,
        ("copyreg" | "copy_reg", "_reconstructor") => Known::Reconstructor,
        ("datetime", "datetime") => Known::Datetime,
        ("datetime", "date") => Known::Date,
        ("datetime", "time") => Known::Time,
        ("datetime", "timedelta") => Known::Timedelta,
        ("datetime", "timezone") => Known::Timezone,
        ("decimal", "Decimal") => Known::Decimal,
        ("uuid", "UUID") => Known::Uuid,
        _ => return None,
    })
}

/// An object in the unpickler's heap. Stack and memo hold indices into the heap, so objects
/// shared through the memo and mutated later (`APPENDS` after `MEMOIZE`) behave as in Python.
#[derive(Debug)]
enum Node {
    Leaf(Value),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Set(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global {
        module: String,
        name: String,
        known: Option<Known>,
    },
    /// An instance of an allow-listed class awaiting its `BUILD` state.
    Instance {
        class: Known,
        state: Option<usize>,
    },
    /// `datetime.timedelta`, in microseconds.
    Timedelta(i128),
    /// `datetime.timezone`, offset in microseconds.
    Timezone(i128),
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    heap: Vec<Node>,
    stack: Vec<usize>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u32, usize>,
}

/// Decodes one pickle into a [`Value`].
pub(crate) fn decode(input: &[u8]) -> Result<Value> {
    let mut m = Machine {
        input,
        pos: 0,
        heap: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: std::collections::HashMap::new(),
    };
    let root = m.run()?;
    // Budget for copies made of shared objects: generous for real data, bounded for bombs.
    let mut budget = (input.len().saturating_mul(64)).max(64 << 20);
    m.to_value(root, 0, &mut budget)
}

impl<'a> Machine<'a> {
    // -- input ----------------------------------------------------------------------------

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let input: &'a [u8] = self.input;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= input.len())
            .ok_or_else(|| {
                format!(
                    "pickle truncated: needs {n} more bytes at offset {}",
                    self.pos
                )
            })?;
        let out = &input[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn line(&mut self) -> Result<&'a [u8]> {
        let input: &'a [u8] = self.input;
        let rest = &input[self.pos..];
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("pickle truncated: missing newline")?;
        self.pos += nl + 1;
        let line = &rest[..nl];
        Ok(line.strip_suffix(b"\r").unwrap_or(line))
    }

    fn line_str(&mut self) -> Result<&'a str> {
        std::str::from_utf8(self.line()?)
            .map_err(|_| "pickle text argument is not UTF-8".to_string())
    }

    fn len_u64(&mut self) -> Result<usize> {
        usize::try_from(u64::from_le_bytes(self.fixed()?))
            .map_err(|_| "pickle length too large".to_string())
    }

    fn len_u32(&mut self) -> Result<usize> {
        Ok(u32::from_le_bytes(self.fixed()?) as usize)
    }

    fn len_i32(&mut self) -> Result<usize> {
        usize::try_from(i32::from_le_bytes(self.fixed()?))
            .map_err(|_| "negative pickle length".to_string())
    }

    // -- heap and stack -------------------------------------------------------------------

    fn push(&mut self, node: Node) {
        self.heap.push(node);
        self.stack.push(self.heap.len() - 1);
    }

    fn push_value(&mut self, value: Value) {
        self.push(Node::Leaf(value));
    }

    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<usize> {
        if self.stack.len() <= self.fence() {
            return Err("pickle stack underflow".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".into())
    }

    fn top(&self) -> Result<usize> {
        if self.stack.len() <= self.fence() {
            return Err("pickle stack underflow".into());
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| "pickle stack underflow".into())
    }

    fn pop_mark(&mut self) -> Result<Vec<usize>> {
        let mark = self.marks.pop().ok_or("pickle MARK missing")?;
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn node(&self, id: usize) -> &Node {
        // Ids always come from `push`, so they are in range.
        &self.heap[id]
    }

    fn memo_get(&self, id: u32) -> Result<usize> {
        self.memo
            .get(&id)
            .copied()
            .ok_or_else(|| format!("pickle memo key {id} is missing"))
    }

    fn memo_put(&mut self, id: u32) -> Result<()> {
        let top = self.top()?;
        self.memo.insert(id, top);
        Ok(())
    }

    fn leaf(&self, id: usize) -> Option<&Value> {
        match self.node(id) {
            Node::Leaf(v) => Some(v),
            _ => None,
        }
    }

    fn items_of(&self, id: usize) -> Result<Vec<usize>> {
        match self.node(id) {
            Node::List(v) | Node::Tuple(v) | Node::Set(v) => Ok(v.clone()),
            Node::Dict(pairs) => Ok(pairs.iter().map(|&(k, _)| k).collect()),
            _ => Err("pickle passes a non-iterable where an iterable is needed".into()),
        }
    }

    fn tuple_args(&self, id: usize) -> Result<Vec<usize>> {
        match self.node(id) {
            Node::Tuple(v) => Ok(v.clone()),
            _ => Err("pickle REDUCE/NEWOBJ arguments are not a tuple".into()),
        }
    }

    // -- the machine ----------------------------------------------------------------------

    fn run(&mut self) -> Result<usize> {
        loop {
            let op = self.byte()?;
            match op {
                b'.' => return self.pop(), // STOP
                0x80 => {
                    let proto = self.byte()?;
                    if proto > 5 {
                        return Err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    // FRAME: framing is transparent to the opcode stream.
                    self.take(8)?;
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    // POP: pops the top item, or the topmost mark if its frame is empty.
                    if self.stack.len() > self.fence() {
                        self.stack.pop();
                    } else if self.marks.pop().is_none() {
                        return Err("pickle stack underflow".into());
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                // -- scalars
                b'N' => self.push_value(Value::Null),
                0x88 => self.push_value(Value::Bool(true)),
                0x89 => self.push_value(Value::Bool(false)),
                b'I' => {
                    let line = self.line_str()?;
                    let v = match line {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(parse_int(line)?),
                    };
                    self.push_value(v);
                }
                b'L' => {
                    let line = self.line_str()?;
                    let v = parse_int(line.strip_suffix('L').unwrap_or(line))?;
                    self.push_value(Value::Int(v));
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.fixed()?);
                    self.push_value(v.into());
                }
                b'K' => {
                    let v = self.byte()?;
                    self.push_value(v.into());
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.fixed()?);
                    self.push_value(v.into());
                }
                0x8a => {
                    let n = self.byte()? as usize;
                    let v = long_from_le(self.take(n)?)?;
                    self.push_value(Value::Int(v));
                }
                0x8b => {
                    let n = self.len_i32()?;
                    let v = long_from_le(self.take(n)?)?;
                    self.push_value(Value::Int(v));
                }
                b'F' => {
                    let line = self.line_str()?;
                    let v: f64 = line
                        .trim()
                        .parse()
                        .map_err(|_| format!("bad pickle float {line:?}"))?;
                    self.push_value(Value::Float(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.fixed()?);
                    self.push_value(Value::Float(v));
                }
                // -- strings and bytes
                b'S' => {
                    let raw = unescape_py2_string(self.line()?)?;
                    self.push_value(text_or_bytes(raw));
                }
                b'T' => {
                    let n = self.len_i32()?;
                    let raw = self.take(n)?.to_vec();
                    self.push_value(text_or_bytes(raw));
                }
                b'U' => {
                    let n = self.byte()? as usize;
                    let raw = self.take(n)?.to_vec();
                    self.push_value(text_or_bytes(raw));
                }
                b'V' => {
                    let s = raw_unicode_escape(self.line()?)?;
                    self.push_value(Value::String(s));
                }
                b'X' => {
                    let n = self.len_u32()?;
                    let s = utf8(self.take(n)?)?;
                    self.push_value(Value::String(s));
                }
                0x8c => {
                    let n = self.byte()? as usize;
                    let s = utf8(self.take(n)?)?;
                    self.push_value(Value::String(s));
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let s = utf8(self.take(n)?)?;
                    self.push_value(Value::String(s));
                }
                b'B' => {
                    let n = self.len_u32()?;
                    let b = self.take(n)?.to_vec();
                    self.push_value(Value::Bytes(b));
                }
                b'C' => {
                    let n = self.byte()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push_value(Value::Bytes(b));
                }
                0x8e | 0x96 => {
                    let n = self.len_u64()?;
                    let b = self.take(n)?.to_vec();
                    self.push_value(Value::Bytes(b));
                }
                // -- containers
                b']' => self.push(Node::List(Vec::new())),
                b')' => self.push(Node::Tuple(Vec::new())),
                b'}' => self.push(Node::Dict(Vec::new())),
                0x8f => self.push(Node::Set(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items));
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Node::Set(items));
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
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.push(Node::Dict(pairs));
                }
                b'a' => {
                    let item = self.pop()?;
                    self.extend_top(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_top(items)?;
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let top = self.top()?;
                    match &mut self.heap[top] {
                        Node::Set(v) => v.extend(items),
                        _ => return Err("pickle ADDITEMS target is not a set".into()),
                    }
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![(key, value)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.set_items(pairs)?;
                }
                // -- memo
                b'p' => {
                    let id = parse_memo_id(self.line_str()?)?;
                    self.memo_put(id)?;
                }
                b'q' => {
                    let id = self.byte()?.into();
                    self.memo_put(id)?;
                }
                b'r' => {
                    let id = u32::from_le_bytes(self.fixed()?);
                    self.memo_put(id)?;
                }
                0x94 => {
                    let id = u32::try_from(self.memo.len())
                        .map_err(|_| "pickle memo too large".to_string())?;
                    self.memo_put(id)?;
                }
                b'g' => {
                    let id = parse_memo_id(self.line_str()?)?;
                    let obj = self.memo_get(id)?;
                    self.stack.push(obj);
                }
                b'h' => {
                    let id = self.byte()?.into();
                    let obj = self.memo_get(id)?;
                    self.stack.push(obj);
                }
                b'j' => {
                    let id = u32::from_le_bytes(self.fixed()?);
                    let obj = self.memo_get(id)?;
                    self.stack.push(obj);
                }
                // -- globals and object construction (allow-listed, never executed)
                b'c' => {
                    let module = self.line_str()?.to_owned();
                    let name = self.line_str()?.to_owned();
                    self.push_global(module, name);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (self.leaf(module), self.leaf(name)) {
                        (Some(Value::String(m)), Some(Value::String(n))) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.push_global(m, n);
                        }
                        _ => return Err("pickle STACK_GLOBAL arguments are not strings".into()),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let args = self.tuple_args(args)?;
                    let node = self.call(callable, &args)?;
                    self.push(node);
                }
                b'i' => {
                    let module = self.line_str()?.to_owned();
                    let name = self.line_str()?.to_owned();
                    let args = self.pop_mark()?;
                    self.push_global(module, name);
                    let callable = self.pop()?;
                    let node = self.call(callable, &args)?;
                    self.push(node);
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err("pickle OBJ without a class".into());
                    }
                    let callable = items.remove(0);
                    let node = self.call(callable, &items)?;
                    self.push(node);
                }
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?; // kwargs
                    }
                    let _args = self.pop()?;
                    let class = self.pop()?;
                    let node = self.new_instance(class)?;
                    self.push(node);
                }
                b'b' => {
                    let state = self.pop()?;
                    let top = self.top()?;
                    match &mut self.heap[top] {
                        Node::Instance {
                            state: slot @ None, ..
                        } => *slot = Some(state),
                        _ => {
                            return Err(
                                "pickle BUILD sets the state of an object kelp cannot represent"
                                    .into(),
                            )
                        }
                    }
                }
                b'P' | b'Q' => return Err("pickle persistent IDs are not supported".into()),
                0x82..=0x84 => {
                    return Err("pickle extension registry codes are not supported".into())
                }
                0x97 | 0x98 => return Err("pickle out-of-band buffers are not supported".into()),
                other => {
                    return Err(format!(
                        "unknown pickle opcode 0x{other:02x} at offset {}",
                        self.pos - 1
                    ))
                }
            }
        }
    }

    fn push_global(&mut self, module: String, name: String) {
        let known = known_global(&module, &name);
        self.push(Node::Global {
            module,
            name,
            known,
        });
    }

    fn extend_top(&mut self, items: Vec<usize>) -> Result<()> {
        let top = self.top()?;
        match &mut self.heap[top] {
            Node::List(v) => {
                v.extend(items);
                Ok(())
            }
            _ => Err("pickle APPEND target is not a list".into()),
        }
    }

    fn set_items(&mut self, new: Vec<(usize, usize)>) -> Result<()> {
        let top = self.top()?;
        match &mut self.heap[top] {
            Node::Dict(v) => {
                v.extend(new);
                Ok(())
            }
            _ => Err("pickle SETITEM target is not a dict".into()),
        }
    }

    fn global_of(&self, id: usize) -> Result<Known> {
        match self.node(id) {
            Node::Global { known: Some(k), .. } => Ok(*k),
            Node::Global {
                module,
                name,
                known: None,
            } => Err(format!(
                "pickle calls {module}.{name}; kelp never executes pickled code and supports only \
                 built-in data types, datetime, Decimal and UUID"
            )),
            _ => Err("pickle calls something that is not a global".into()),
        }
    }

    /// `NEWOBJ` / `copyreg._reconstructor`: `cls.__new__(cls)`.
    fn new_instance(&self, class: usize) -> Result<Node> {
        Ok(match self.global_of(class)? {
            Known::Uuid => Node::Instance {
                class: Known::Uuid,
                state: None,
            },
            Known::List => Node::List(Vec::new()),
            Known::Set => Node::Set(Vec::new()),
            Known::Dict | Known::OrderedDict => Node::Dict(Vec::new()),
            _ => return Err("pickle creates an instance of a class kelp cannot represent".into()),
        })
    }

    /// `REDUCE`: reproduce the effect of an allow-listed callable on plain data.
    fn call(&self, callable: usize, args: &[usize]) -> Result<Node> {
        let known = self.global_of(callable)?;
        let arg = |i: usize| args.get(i).copied();
        let leaf = |i: usize| arg(i).and_then(|a| self.leaf(a));
        let bad = || format!("pickle calls {known:?} with unsupported arguments");
        Ok(match known {
            Known::Set | Known::List | Known::Tuple => {
                let items = match arg(0) {
                    None => Vec::new(),
                    Some(a) => self.items_of(a)?,
                };
                match known {
                    Known::Set => Node::Set(items),
                    Known::List => Node::List(items),
                    _ => Node::Tuple(items),
                }
            }
            Known::Dict | Known::OrderedDict => match arg(0) {
                None => Node::Dict(Vec::new()),
                Some(a) => match self.node(a) {
                    Node::Dict(p) => Node::Dict(p.clone()),
                    Node::List(items) | Node::Tuple(items) => {
                        let mut out = Vec::with_capacity(items.len());
                        for &item in items {
                            match self.node(item) {
                                Node::Tuple(kv) | Node::List(kv) if kv.len() == 2 => {
                                    out.push((kv[0], kv[1]))
                                }
                                _ => return Err(bad()),
                            }
                        }
                        Node::Dict(out)
                    }
                    _ => return Err(bad()),
                },
            },
            Known::Bytes | Known::Bytearray => match (arg(0), leaf(0)) {
                (None, _) => Node::Leaf(Value::Bytes(Vec::new())),
                (_, Some(Value::Bytes(b))) => Node::Leaf(Value::Bytes(b.clone())),
                (_, Some(Value::String(s))) => {
                    Node::Leaf(Value::Bytes(encode_str(s, leaf(1)).ok_or_else(bad)?))
                }
                (Some(a), _) => {
                    let mut out = Vec::new();
                    for item in self.items_of(a)? {
                        match self.leaf(item) {
                            Some(Value::Int(i)) => out.push(u8::try_from(*i).map_err(|_| bad())?),
                            _ => return Err(bad()),
                        }
                    }
                    Node::Leaf(Value::Bytes(out))
                }
            },
            Known::CodecsEncode => match leaf(0) {
                Some(Value::String(s)) => {
                    Node::Leaf(Value::Bytes(encode_str(s, leaf(1)).ok_or_else(bad)?))
                }
                _ => return Err(bad()),
            },
            Known::Reconstructor => {
                let class = arg(0).ok_or_else(bad)?;
                self.new_instance(class)?
            }
            Known::Object => return Err(bad()),
            Known::Decimal => match leaf(0) {
                Some(Value::String(s)) => Node::Leaf(Value::String(s.clone())),
                Some(Value::Int(i)) => Node::Leaf(Value::String(i.to_string())),
                None if arg(0).is_none() => Node::Leaf(Value::String("0".into())),
                _ => return Err(bad()),
            },
            Known::Uuid => match leaf(0) {
                Some(Value::String(s)) => {
                    Node::Leaf(Value::String(uuid_from_hex(s).ok_or_else(bad)?))
                }
                _ => return Err(bad()),
            },
            Known::Timedelta => {
                let mut parts = [0i128; 3];
                for (i, part) in parts.iter_mut().enumerate() {
                    match leaf(i) {
                        Some(Value::Int(v)) => *part = *v,
                        None if arg(i).is_none() => {}
                        _ => return Err(bad()),
                    }
                }
                let us = parts[0]
                    .checked_mul(86_400_000_000)
                    .and_then(|d| d.checked_add(parts[1].checked_mul(1_000_000)?))
                    .and_then(|d| d.checked_add(parts[2]))
                    .ok_or_else(bad)?;
                Node::Timedelta(us)
            }
            Known::Timezone => match arg(0).map(|a| self.node(a)) {
                Some(Node::Timedelta(us)) => Node::Timezone(*us),
                _ => return Err(bad()),
            },
            Known::Datetime | Known::Date | Known::Time => {
                let state = match leaf(0) {
                    Some(Value::Bytes(b)) => b.clone(),
                    Some(Value::String(s)) => encode_str(s, None).ok_or_else(bad)?,
                    _ => return Err(bad()),
                };
                let tz = match arg(1).map(|a| self.node(a)) {
                    None | Some(Node::Leaf(Value::Null)) => None,
                    Some(Node::Timezone(us)) => Some(*us),
                    Some(_) => {
                        return Err(
                            "pickled datetime has a tzinfo other than datetime.timezone".into()
                        );
                    }
                };
                Node::Leaf(Value::String(
                    format_temporal(known, &state, tz).ok_or_else(bad)?,
                ))
            }
        })
    }

    // -- conversion to Value ---------------------------------------------------------------

    fn to_value(&self, id: usize, depth: usize, budget: &mut usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "pickle nests deeper than {MAX_DEPTH} levels (or is recursive)"
            ));
        }
        let cost = match self.node(id) {
            Node::Leaf(Value::String(s)) => s.len(),
            Node::Leaf(Value::Bytes(b)) => b.len(),
            _ => 0,
        } + 32;
        *budget = budget
            .checked_sub(cost)
            .ok_or("pickle expands shared objects beyond kelp's size budget")?;
        let list = |items: &[usize], budget: &mut usize| -> Result<Value> {
            let mut out = Vec::with_capacity(items.len());
            for &item in items {
                out.push(self.to_value(item, depth + 1, budget)?);
            }
            Ok(Value::List(out))
        };
        Ok(match self.node(id) {
            Node::Leaf(v) => v.clone(),
            Node::List(items) | Node::Tuple(items) | Node::Set(items) => list(items, budget)?,
            Node::Dict(pairs) => {
                let mut out = Vec::with_capacity(pairs.len());
                for &(k, v) in pairs {
                    out.push((
                        self.to_value(k, depth + 1, budget)?,
                        self.to_value(v, depth + 1, budget)?,
                    ));
                }
                Value::Map(out)
            }
            Node::Global { module, name, .. } => {
                return Err(format!(
                    "pickle contains a reference to {module}.{name}, which kelp cannot represent"
                ));
            }
            Node::Instance {
                class: Known::Uuid,
                state,
            } => {
                let int = state.and_then(|s| match self.node(s) {
                    Node::Dict(pairs) => pairs.iter().find_map(|&(k, v)| {
                        matches!(self.leaf(k), Some(Value::String(k)) if k == "int")
                            .then(|| self.leaf(v))
                            .flatten()
                    }),
                    _ => None,
                });
                match int {
                    Some(Value::Int(i)) if *i >= 0 => Value::String(format_uuid(*i as u128)),
                    _ => return Err("pickled uuid.UUID has no valid 'int' state".into()),
                }
            }
            Node::Instance { .. } => {
                return Err("pickle contains an instance kelp cannot represent".into())
            }
            Node::Timedelta(us) => Value::Float(*us as f64 / 1e6),
            Node::Timezone(us) => Value::String(format_offset(*us)),
        })
    }
}

// -- helpers ------------------------------------------------------------------------------

fn pairs(items: Vec<usize>) -> Result<Vec<(usize, usize)>> {
    if items.len() % 2 != 0 {
        return Err("pickle dict has an odd number of items".into());
    }
    Ok(items.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}

fn parse_int(s: &str) -> Result<i128> {
    s.trim()
        .parse()
        .map_err(|_| format!("pickle integer {s:?} is invalid or wider than 128 bits"))
}

fn parse_memo_id(s: &str) -> Result<u32> {
    s.trim()
        .parse()
        .map_err(|_| format!("bad pickle memo key {s:?}"))
}

/// `LONG1`/`LONG4`: little-endian two's complement.
fn long_from_le(bytes: &[u8]) -> Result<i128> {
    let Some(&last) = bytes.last() else {
        return Ok(0);
    };
    let sign = if last & 0x80 != 0 { 0xff } else { 0x00 };
    if bytes.len() > 16 && bytes[16..].iter().any(|&b| b != sign) {
        return Err("pickle integer is wider than 128 bits".into());
    }
    let mut buf = [sign; 16];
    let n = bytes.len().min(16);
    buf[..n].copy_from_slice(&bytes[..n]);
    let v = i128::from_le_bytes(buf);
    if (v < 0) != (sign == 0xff) {
        return Err("pickle integer is wider than 128 bits".into());
    }
    Ok(v)
}

fn utf8(bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "pickle string is not valid UTF-8".to_string())
}

/// Python 2 `str` values: text when they are UTF-8, bytes otherwise.
fn text_or_bytes(raw: Vec<u8>) -> Value {
    match String::from_utf8(raw) {
        Ok(s) => Value::String(s),
        Err(e) => Value::Bytes(e.into_bytes()),
    }
}

/// `str.encode(encoding)` for the encodings pickle uses to carry bytes (`latin1`).
fn encode_str(s: &str, encoding: Option<&Value>) -> Option<Vec<u8>> {
    let enc = match encoding {
        None => "latin1".to_owned(),
        Some(Value::String(e)) => e.to_ascii_lowercase().replace('_', "-"),
        Some(_) => return None,
    };
    match enc.as_str() {
        "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1" | "l1" => {
            s.chars().map(|c| u8::try_from(c).ok()).collect()
        }
        "utf-8" | "utf8" => Some(s.as_bytes().to_vec()),
        "ascii" | "us-ascii" => s.is_ascii().then(|| s.as_bytes().to_vec()),
        _ => None,
    }
}

/// The `S` opcode: a Python 2 `repr()` of a byte string.
fn unescape_py2_string(line: &[u8]) -> Result<Vec<u8>> {
    let inner = match line {
        [q @ (b'\'' | b'"'), inner @ .., last] if last == q => inner,
        _ => return Err("pickle STRING argument is not quoted".into()),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let c = inner[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let Some(&e) = inner.get(i) else {
            return Err("pickle STRING ends with a backslash".into());
        };
        i += 1;
        match e {
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'v' => out.push(0x0b),
            b'\n' => {}
            b'x' => {
                let hex = inner
                    .get(i..i + 2)
                    .ok_or("pickle STRING has a bad \\x escape")?;
                let hex =
                    std::str::from_utf8(hex).map_err(|_| "pickle STRING has a bad \\x escape")?;
                out.push(
                    u8::from_str_radix(hex, 16)
                        .map_err(|_| "pickle STRING has a bad \\x escape")?,
                );
                i += 2;
            }
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match inner.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            other => {
                // `\\`, `\'`, `\"` and unknown escapes (kept verbatim, as Python does).
                if !matches!(other, b'\\' | b'\'' | b'"') {
                    out.push(b'\\');
                }
                out.push(other);
            }
        }
    }
    Ok(out)
}

/// The `V` opcode: `raw-unicode-escape` (latin-1 bytes plus `\uXXXX` / `\UXXXXXXXX`).
fn raw_unicode_escape(line: &[u8]) -> Result<String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let c = line[i];
        let width = match (c, line.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        if width == 0 {
            out.push(char::from(c));
            i += 1;
            continue;
        }
        let hex = line
            .get(i + 2..i + 2 + width)
            .ok_or("pickle UNICODE has a bad escape")?;
        let hex = std::str::from_utf8(hex).map_err(|_| "pickle UNICODE has a bad escape")?;
        let code = u32::from_str_radix(hex, 16).map_err(|_| "pickle UNICODE has a bad escape")?;
        out.push(char::from_u32(code).ok_or("pickle UNICODE contains a lone surrogate")?);
        i += 2 + width;
    }
    Ok(out)
}

fn uuid_from_hex(s: &str) -> Option<String> {
    let s = s.trim().strip_prefix("urn:uuid:").unwrap_or(s.trim());
    let hex: String = s
        .chars()
        .filter(|c| !matches!(c, '{' | '}' | '-'))
        .collect();
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok().map(format_uuid)
}

pub(crate) fn format_uuid(v: u128) -> String {
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `+HH:MM[:SS[.ffffff]]`, as Python's `isoformat()` prints UTC offsets.
fn format_offset(us: i128) -> String {
    let sign = if us < 0 { '-' } else { '+' };
    let us = us.unsigned_abs();
    let (secs, micros) = (us / 1_000_000, us % 1_000_000);
    let mut out = format!("{sign}{:02}:{:02}", secs / 3600, secs % 3600 / 60);
    if secs % 60 != 0 || micros != 0 {
        out.push_str(&format!(":{:02}", secs % 60));
    }
    if micros != 0 {
        out.push_str(&format!(".{micros:06}"));
    }
    out
}

/// Python's pickled `datetime`/`date`/`time` state bytes to `isoformat()` text.
fn format_temporal(kind: Known, s: &[u8], tz: Option<i128>) -> Option<String> {
    let time = |h: u8, mi: u8, sec: u8, us: &[u8]| -> Option<String> {
        let us = (u32::from(us[0]) << 16) | (u32::from(us[1]) << 8) | u32::from(us[2]);
        if h > 23 || mi > 59 || sec > 59 || us > 999_999 {
            return None;
        }
        let mut out = format!("{h:02}:{mi:02}:{sec:02}");
        if us != 0 {
            out.push_str(&format!(".{us:06}"));
        }
        if let Some(tz) = tz {
            out.push_str(&format_offset(tz));
        }
        Some(out)
    };
    let date = |y0: u8, y1: u8, m: u8, d: u8| -> Option<String> {
        let year = u16::from(y0) << 8 | u16::from(y1);
        ((1..=9999).contains(&year) && (1..=12).contains(&m) && (1..=31).contains(&d))
            .then(|| format!("{year:04}-{m:02}-{d:02}"))
    };
    match (kind, s) {
        (Known::Date, [y0, y1, m, d]) => date(*y0, *y1, *m, *d),
        (Known::Time, [h, mi, sec, us @ ..]) if us.len() == 3 => time(h & 0x7f, *mi, *sec, us),
        (Known::Datetime, [y0, y1, m, d, h, mi, sec, us @ ..]) if us.len() == 3 => Some(format!(
            "{}T{}",
            date(*y0, *y1, m & 0x7f, *d)?,
            time(*h, *mi, *sec, us)?
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    // kitchen = [uuid.UUID('12345678-1234-5678-1234-567812345678'),
    //     datetime.datetime(2024, 1, 2, 3, 4, 5, 6789, tzinfo=datetime.timezone.utc),
    //     datetime.date(2024, 1, 2), decimal.Decimal('1.50'), b'\x00\xff', {1, 2},
    //     collections.OrderedDict(a=1)]
    /// `pickle.dumps(kitchen, protocol)` for protocols 0..=5, from Python 3.11 (hex).
    const KITCHEN: [&str; 6] = [
        "286c70300a63636f70795f7265670a5f7265636f6e7374727563746f720a70310a2863757569640a555549440a70320a635f5f6275696c74696e5f5f0a6f626a6563740a70330a4e7470340a5270350a286470360a56696e740a70370a4c32343139373835373136313031313731353136323137313833393633363938383737383130344c0a736261636461746574696d650a6461746574696d650a70380a28635f636f646563730a656e636f64650a70390a285607e801020304055c75303030305c7530303161850a7031300a566c6174696e310a7031310a747031320a527031330a636461746574696d650a74696d657a6f6e650a7031340a28636461746574696d650a74696d6564656c74610a7031350a2849300a49300a49300a747031360a527031370a747031380a527031390a747032300a527032310a61636461746574696d650a646174650a7032320a2867390a285607e801020a7032330a6731310a747032340a527032350a747032360a527032370a6163646563696d616c0a446563696d616c0a7032380a2856312e35300a7032390a747033300a527033310a6167390a28565c7530303030ff0a7033320a6731310a747033330a527033340a61635f5f6275696c74696e5f5f0a7365740a7033350a28286c7033360a49310a6149320a61747033370a527033380a6163636f6c6c656374696f6e730a4f726465726564446963740a7033390a2874527034300a56610a7034310a49310a73612e",
        "5d71002863636f70795f7265670a5f7265636f6e7374727563746f720a71012863757569640a555549440a7102635f5f6275696c74696e5f5f0a6f626a6563740a71034e7471045271057d71065803000000696e7471074c32343139373835373136313031313731353136323137313833393633363938383737383130344c0a7362636461746574696d650a6461746574696d650a710828635f636f646563730a656e636f64650a710928580c00000007c3a80102030405001ac285710a58060000006c6174696e31710b74710c52710d636461746574696d650a74696d657a6f6e650a710e28636461746574696d650a74696d6564656c74610a710f284b004b004b00747110527111747112527113747114527115636461746574696d650a646174650a711628680928580500000007c3a801027117680b74711852711974711a52711b63646563696d616c0a446563696d616c0a711c285804000000312e3530711d74711e52711f680928580300000000c3bf7120680b747121527122635f5f6275696c74696e5f5f0a7365740a7123285d7124284b014b026574712552712663636f6c6c656374696f6e730a4f726465726564446963740a71272952712858010000006171294b0173652e",
        "80025d71002863757569640a555549440a7101298171027d71035803000000696e7471048a10785634127856341278563412785634127362636461746574696d650a6461746574696d650a7105635f636f646563730a656e636f64650a7106580c00000007c3a80102030405001ac285710758060000006c6174696e31710886710952710a636461746574696d650a74696d657a6f6e650a710b636461746574696d650a74696d6564656c74610a710c4b004b004b0087710d52710e85710f527110867111527112636461746574696d650a646174650a71136806580500000007c3a801027114680886711552711685711752711863646563696d616c0a446563696d616c0a71195804000000312e3530711a85711b52711c6806580300000000c3bf711d680886711e52711f635f5f6275696c74696e5f5f0a7365740a71205d7121284b014b026585712252712363636f6c6c656374696f6e730a4f726465726564446963740a71242952712558010000006171264b0173652e",
        "80035d71002863757569640a555549440a7101298171027d71035803000000696e7471048a10785634127856341278563412785634127362636461746574696d650a6461746574696d650a7105430a07e80102030405001a857106636461746574696d650a74696d657a6f6e650a7107636461746574696d650a74696d6564656c74610a71084b004b004b0087710952710a85710b52710c86710d52710e636461746574696d650a646174650a710f430407e80102711085711152711263646563696d616c0a446563696d616c0a71135804000000312e35307114857115527116430200ff7117636275696c74696e730a7365740a71185d7119284b014b026585711a52711b63636f6c6c656374696f6e730a4f726465726564446963740a711c2952711d580100000061711e4b0173652e",
        "800495f6000000000000005d94288c0475756964948c04555549449493942981947d948c03696e74948a107856341278563412785634127856341273628c086461746574696d65948c086461746574696d65949394430a07e80102030405001a859468078c0874696d657a6f6e6594939468078c0974696d6564656c74619493944b004b004b0087945294859452948694529468078c0464617465949394430407e8010294859452948c07646563696d616c948c07446563696d616c9493948c04312e35309485945294430200ff948f94284b014b02908c0b636f6c6c656374696f6e73948c0b4f726465726564446963749493942952948c0161944b0173652e",
        "800595f6000000000000005d94288c0475756964948c04555549449493942981947d948c03696e74948a107856341278563412785634127856341273628c086461746574696d65948c086461746574696d65949394430a07e80102030405001a859468078c0874696d657a6f6e6594939468078c0974696d6564656c74619493944b004b004b0087945294859452948694529468078c0464617465949394430407e8010294859452948c07646563696d616c948c07446563696d616c9493948c04312e35309485945294430200ff948f94284b014b02908c0b636f6c6c656374696f6e73948c0b4f726465726564446963749493942952948c0161944b0173652e",
    ];

    // scalars = [None, True, False, 0, -1, 255, 65535, -2**31, 2**31, 2**63, -2**100, 1.5,
    //     float('inf'), "é€😀", "", b"", bytearray(b"ab"), (1, (2,)), frozenset(),
    //     {"k": [1, {"n": None}]},
    //     datetime.time(13, 14, 15, tzinfo=datetime.timezone(datetime.timedelta(hours=-5, minutes=-30))),
    //     datetime.timedelta(days=1, seconds=2, microseconds=3), datetime.datetime(2020, 5, 6)]
    /// `pickle.dumps(scalars, protocol)` for protocols 0..=5, from Python 3.11 (hex).
    const SCALARS: [&str; 6] = [
        "286c70300a4e614930310a614930300a6149300a61492d310a61493235350a614936353533350a61492d323134373438333634380a614c323134373438333634384c0a614c393232333337323033363835343737353830384c0a614c2d313236373635303630303232383232393430313439363730333230353337364c0a6146312e350a6146696e660a6156e95c75323061635c5530303031663630300a70310a61560a70320a61635f5f6275696c74696e5f5f0a62797465730a70330a28745270340a61635f5f6275696c74696e5f5f0a6279746561727261790a70350a28635f636f646563730a656e636f64650a70360a285661620a70370a566c6174696e310a70380a7470390a527031300a747031310a527031320a612849310a2849320a747031330a747031340a61635f5f6275696c74696e5f5f0a66726f7a656e7365740a7031350a28286c7031360a747031370a527031380a6128647031390a566b0a7032300a286c7032310a49310a6128647032320a566e0a7032330a4e73617361636461746574696d650a74696d650a7032340a2867360a28565c75303030640e0f5c75303030305c75303030305c75303030300a7032350a67380a747032360a527032370a636461746574696d650a74696d657a6f6e650a7032380a28636461746574696d650a74696d6564656c74610a7032390a28492d310a4936363630300a49300a747033300a527033310a747033320a527033330a747033340a527033350a616732390a2849310a49320a49330a747033360a527033370a61636461746574696d650a6461746574696d650a7033380a2867360a285607e405065c75303030305c75303030305c75303030305c75303030305c75303030305c75303030300a7033390a67380a747034300a527034310a747034320a527034330a612e",
        "5d7100284e4930310a4930300a4b004affffffff4bff4dffff4a000000804c323134373438333634384c0a4c393232333337323033363835343737353830384c0a4c2d313236373635303630303232383232393430313439363730333230353337364c0a473ff8000000000000477ff00000000000005809000000c3a9e282acf09f9880710158000000007102635f5f6275696c74696e5f5f0a62797465730a710329527104635f5f6275696c74696e5f5f0a6279746561727261790a710528635f636f646563730a656e636f64650a71062858020000006162710758060000006c6174696e31710874710952710a74710b52710c284b01284b0274710d74710e635f5f6275696c74696e5f5f0a66726f7a656e7365740a710f285d71107471115271127d711358010000006b71145d7115284b017d711658010000006e71174e736573636461746574696d650a74696d650a71182868062858060000000d0e0f0000007119680874711a52711b636461746574696d650a74696d657a6f6e650a711c28636461746574696d650a74696d6564656c74610a711d284affffffff4a280401004b0074711e52711f747120527121747122527123681d284b014b024b03747124527125636461746574696d650a6461746574696d650a712628680628580b00000007c3a405060000000000007127680874712852712974712a52712b652e",
        "80025d7100284e88894b004affffffff4bff4dffff4a000000808a0500000080008a090000000000000080008a0d000000000000000000000000f0473ff8000000000000477ff00000000000005809000000c3a9e282acf09f9880710158000000007102635f5f6275696c74696e5f5f0a62797465730a710329527104635f5f6275696c74696e5f5f0a6279746561727261790a7105635f636f646563730a656e636f64650a710658020000006162710758060000006c6174696e31710886710952710a85710b52710c4b014b0285710d86710e635f5f6275696c74696e5f5f0a66726f7a656e7365740a710f5d71108571115271127d711358010000006b71145d7115284b017d711658010000006e71174e736573636461746574696d650a74696d650a7118680658060000000d0e0f0000007119680886711a52711b636461746574696d650a74696d657a6f6e650a711c636461746574696d650a74696d6564656c74610a711d4affffffff4a280401004b0087711e52711f857120527121867122527123681d4b014b024b03877124527125636461746574696d650a6461746574696d650a71266806580b00000007c3a405060000000000007127680886712852712985712a52712b652e",
        "80035d7100284e88894b004affffffff4bff4dffff4a000000808a0500000080008a090000000000000080008a0d000000000000000000000000f0473ff8000000000000477ff00000000000005809000000c3a9e282acf09f988071015800000000710243007103636275696c74696e730a6279746561727261790a71044302616271058571065271074b014b02857108867109636275696c74696e730a66726f7a656e7365740a710a5d710b85710c52710d7d710e58010000006b710f5d7110284b017d711158010000006e71124e736573636461746574696d650a74696d650a711343060d0e0f0000007114636461746574696d650a74696d657a6f6e650a7115636461746574696d650a74696d6564656c74610a71164affffffff4a280401004b0087711752711885711952711a86711b52711c68164b014b024b0387711d52711e636461746574696d650a6461746574696d650a711f430a07e405060000000000007120857121527122652e",
        "80049520010000000000005d94284e88894b004affffffff4bff4dffff4a000000808a0500000080008a090000000000000080008a0d000000000000000000000000f0473ff8000000000000477ff00000000000008c09c3a9e282acf09f9880948c00944300948c086275696c74696e73948c096279746561727261799493944302616294859452944b014b02859486942891947d948c016b945d94284b017d948c016e944e7365738c086461746574696d65948c0474696d6594939443060d0e0f0000009468128c0874696d657a6f6e6594939468128c0974696d6564656c74619493944affffffff4a280401004b0087945294859452948694529468194b014b024b038794529468128c086461746574696d65949394430a07e405060000000000009485945294652e",
        "8005950a010000000000005d94284e88894b004affffffff4bff4dffff4a000000808a0500000080008a090000000000000080008a0d000000000000000000000000f0473ff8000000000000477ff00000000000008c09c3a9e282acf09f9880948c00944300949602000000000000006162944b014b02859486942891947d948c016b945d94284b017d948c016e944e7365738c086461746574696d65948c0474696d6594939443060d0e0f00000094680d8c0874696d657a6f6e65949394680d8c0974696d6564656c74619493944affffffff4a280401004b0087945294859452948694529468144b014b024b0387945294680d8c086461746574696d65949394430a07e405060000000000009485945294652e",
    ];

    #[test]
    fn python_kitchen_sink_all_protocols() {
        let expected = Value::List(vec![
            s("12345678-1234-5678-1234-567812345678"),
            s("2024-01-02T03:04:05.006789+00:00"),
            s("2024-01-02"),
            s("1.50"),
            Value::Bytes(vec![0, 0xff]),
            Value::List(vec![1.into(), 2.into()]),
            Value::Map(vec![(s("a"), 1.into())]),
        ]);
        for (proto, hex) in KITCHEN.iter().enumerate() {
            assert_eq!(
                decode(&unhex(hex)),
                Ok(expected.clone()),
                "protocol {proto}"
            );
        }
    }

    #[test]
    fn python_scalars_all_protocols() {
        let expected = Value::List(vec![
            Value::Null,
            true.into(),
            false.into(),
            0.into(),
            (-1).into(),
            255.into(),
            65535.into(),
            (-(1i64 << 31)).into(),
            (1i64 << 31).into(),
            Value::Int(1i128 << 63),
            Value::Int(-(1i128 << 100)),
            1.5.into(),
            f64::INFINITY.into(),
            s("é€😀"),
            s(""),
            Value::Bytes(vec![]),
            Value::Bytes(b"ab".to_vec()),
            Value::List(vec![1.into(), Value::List(vec![2.into()])]),
            Value::List(vec![]),
            Value::Map(vec![(
                s("k"),
                Value::List(vec![1.into(), Value::Map(vec![(s("n"), Value::Null)])]),
            )]),
            s("13:14:15-05:30"),
            Value::Float(86_402.000_003),
            s("2020-05-06T00:00:00"),
        ]);
        for (proto, hex) in SCALARS.iter().enumerate() {
            assert_eq!(
                decode(&unhex(hex)),
                Ok(expected.clone()),
                "protocol {proto}"
            );
        }
    }

    #[test]
    fn shared_references_are_copied_and_cycles_refused() {
        // x = [1]; pickle.dumps([x, x], 2)
        let shared = unhex("80025d7100285d71014b01616801652e");
        let one = Value::List(vec![1.into()]);
        assert_eq!(decode(&shared), Ok(Value::List(vec![one.clone(), one])));
        // a = []; a.append(a); pickle.dumps(a, 2)
        let err = decode(&unhex("80025d71006800612e")).unwrap_err();
        assert!(err.contains("deeper"), "{err}");
    }

    #[test]
    fn rejects_code_execution() {
        // The classic `os.system` payload, protocol 0 ...
        let err = decode(b"cos\nsystem\n(S'echo pwned'\ntR.").unwrap_err();
        assert!(err.contains("os.system"), "{err}");
        // ... and protocol 4 with STACK_GLOBAL.
        let evil = b"\x80\x04\x8c\x05posix\x8c\x06system\x93\x8c\x06echo x\x85R.";
        let err = decode(evil).unwrap_err();
        assert!(err.contains("posix.system"), "{err}");
        // INST, OBJ and NEWOBJ of unknown classes, and bare references, are refused too.
        assert!(decode(b"(S'x'\nisubprocess\nPopen\n.")
            .unwrap_err()
            .contains("subprocess.Popen"));
        assert!(decode(b"(cbuiltins\neval\nS'1'\no.")
            .unwrap_err()
            .contains("builtins.eval"));
        assert!(decode(b"\x80\x02cfoo\nBar\n)\x81.")
            .unwrap_err()
            .contains("foo.Bar"));
        assert!(decode(b"cbuiltins\neval\n.")
            .unwrap_err()
            .contains("builtins.eval"));
        assert!(decode(b"\x80\x02]q\x00cfoo\nBar\n)\x81}b.").is_err());
        assert!(decode(b"P1\n.").unwrap_err().contains("persistent"));
        assert!(decode(b"\x80\x02\x82\x01.")
            .unwrap_err()
            .contains("extension"));
        assert!(decode(b"\x80\x05\x97.")
            .unwrap_err()
            .contains("out-of-band"));
    }

    #[test]
    fn depth_bomb_is_refused() {
        let mut deep = vec![b'('; 100_000];
        deep.extend(std::iter::repeat_n(b'l', 100_000));
        deep.push(b'.');
        let err = decode(&deep).unwrap_err();
        assert!(err.contains("deeper"), "{err}");
    }

    #[test]
    fn memo_expansion_bomb_is_refused() {
        // L0 = ['x' * 1000]; for i in 1..=60: Li = [Li-1, Li-1]  -> 2**60 copies if expanded.
        let mut bomb = b"\x80\x02]q\x00X\xe8\x03\x00\x00".to_vec();
        bomb.extend(std::iter::repeat_n(b'x', 1000));
        bomb.push(b'a');
        for i in 1..=60u8 {
            bomb.extend([b']', b'q', i, b'h', i - 1, b'a', b'h', i - 1, b'a']);
        }
        bomb.push(b'.');
        let started = std::time::Instant::now();
        let err = decode(&bomb).unwrap_err();
        assert!(err.contains("budget"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn malformed_input_is_an_error() {
        for bad in [
            &b""[..],
            b".",
            b"N",
            b"\x80\x06N.",
            b"X\xff\xff\xff\xffabc.",
            b"\x8e\xff\xff\xff\xff\xff\xff\xff\xffabc.",
            b"T\xff\xff\xff\xff.",
            b"\x8b\x00\x00\x00\x80.",
            b"h\x05.",
            b"a.",
            b"(N)a.",
            b"N}s.",
            b"Nt.",
            b"(N(Nd.",
            b"I12x\n.",
            b"Fnope\n.",
            b"S'unterminated\n.",
            b"Vbad\\u12\n.",
            b"\x8a\x11\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01.",
            b"\xff",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} decoded");
        }
    }

    #[test]
    fn text_opcodes_unescape() {
        assert_eq!(decode(b"S'a\\n\\x41\\101\\''\n."), Ok(s("a\nAA'")));
        assert_eq!(decode(b"Vx\\u20ac\\U0001f600\n."), Ok(s("x€😀")));
        assert_eq!(
            decode(b"U\x02\xff\xfe."),
            Ok(Value::Bytes(vec![0xff, 0xfe]))
        );
        assert_eq!(
            decode(
                b"\x8a\x11\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff."
            ),
            Ok(Value::Int(-1))
        );
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn random_opcode_soup_never_panics(ops in proptest::collection::vec(
            proptest::sample::select(b"().012NIJKLMGFSTUVXBCabdeghjlopqrstu}])\x80\x85\x86\x87\x88\x89\x8a\x8c\x8f\x90\x91\x93\x94\x95\x81R".to_vec()),
            0..256,
        )) {
            let _ = decode(&ops);
        }
    }
}
