//! The Lua scripts the transport runs in Redis, each one round trip doing what would otherwise
//! take several, atomically. They are sent by SHA (`EVALSHA`), loaded once per server.

use std::sync::OnceLock;

/// Take up to `ARGV[1]` waiting messages in one atomic step: lists in `KEYS[3..]`, grouped
/// by priority step (`ARGV[4]` queues per group, highest precedence first), served round
/// robin within a group as Kombu's rotating `BRPOP` serves them. With `ARGV[3] == "1"` each
/// message that is a JSON document is recorded in `unacked` (`KEYS[1]`, as
/// `[envelope, exchange, routing_key]`) and `unacked_index` (`KEYS[2]`, scored `ARGV[2]`)
/// under its Kombu delivery tag, so no message is ever out of Redis's sight. Returns
/// `key, entry, tag` triples; the tag is empty where nothing was recorded (not JSON, or no
/// printable delivery tag), and the caller records those itself.
const TAKE_READY: &str = r#"
local max = tonumber(ARGV[1])
local track = ARGV[3] == '1'
local nq = tonumber(ARGV[4])
local out = {}
local n = 0
local groups = (#KEYS - 2) / nq
for g = 0, groups - 1 do
  local live = {}
  for i = 0, nq - 1 do live[#live + 1] = KEYS[3 + g * nq + i] end
  while n < max and #live > 0 do
    local still = {}
    for _, key in ipairs(live) do
      if n >= max then break end
      local raw = redis.call('RPOP', key)
      if raw then
        n = n + 1
        local tag = ''
        if track then
          local ok, m = pcall(cjson.decode, raw)
          if ok and type(m) == 'table' and type(m.properties) == 'table' then
            local p = m.properties
            local ex, rk = '', ''
            if type(p.delivery_tag) == 'string' and p.delivery_tag ~= ''
                and not string.find(p.delivery_tag, '[^\32-\126]') then
              tag = p.delivery_tag
            end
            local di = p.delivery_info
            if type(di) == 'table' then
              if type(di.exchange) == 'string' then ex = di.exchange end
              if type(di.routing_key) == 'string' then rk = di.routing_key end
            end
            if tag ~= '' then
              redis.call('ZADD', KEYS[2], ARGV[2], tag)
              redis.call('HSET', KEYS[1], tag,
                '[' .. raw .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']')
            end
          end
        end
        out[#out + 1] = key
        out[#out + 1] = raw
        out[#out + 1] = tag
        still[#still + 1] = key
      end
    end
    live = still
  end
end
return out
"#;

/// Publish to a named exchange in one round trip: read its bindings (`KEYS[1]`, Kombu's
/// `_kombu.binding.<exchange>` set), match routing key `ARGV[1]` the way `ARGV[2]` says
/// (`direct`: equal keys; `topic`: Kombu's topic regex, here as a Lua pattern; `auto`, for an
/// exchange not declared in this process: a binding with a pattern is a topic binding), and
/// `LPUSH` envelope `ARGV[3]` once to each matched queue's list (`ARGV[4]` key prefix, queue,
/// `ARGV[5]` priority suffix). `ARGV[6]` is Kombu's separator. Returns how many queues got it.
const PUBLISH: &str = r#"
local rk, how, env, prefix, suffix, sep = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local function escape(c)
  if c == '\0' then return '%z' end
  return '%' .. c
end
local function topic(bkey)
  local parts = {}
  for word in string.gmatch(bkey .. '.', '([^.]*)%.') do
    if word == '*' then
      parts[#parts + 1] = '[^.]+'
    elseif word == '#' then
      parts[#parts + 1] = '.-'
    else
      parts[#parts + 1] = (string.gsub(word, '[^%w]', escape))
    end
  end
  return string.find(rk, '^' .. table.concat(parts, '%.') .. '$') ~= nil
end
local seen, n = {}, 0
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local i = string.find(m, sep, 1, true)
  local j = i and string.find(m, sep, i + #sep, true)
  if j then
    local bkey = string.sub(m, 1, i - 1)
    local pattern = string.sub(m, i + #sep, j - 1)
    local queue = string.sub(m, j + #sep)
    local hit
    if how == 'topic' or (how == 'auto' and pattern ~= '') then
      hit = topic(bkey)
    else
      hit = bkey == rk
    end
    if hit and not seen[queue] then
      seen[queue] = true
      n = n + 1
      redis.call('LPUSH', prefix .. queue .. suffix, env)
    end
  end
end
return n
"#;

/// [`TAKE_READY`], compiled once.
pub(super) fn take_ready() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    S.get_or_init(|| redis::Script::new(TAKE_READY))
}

/// [`PUBLISH`], compiled once.
pub(super) fn publish() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    S.get_or_init(|| redis::Script::new(PUBLISH))
}
