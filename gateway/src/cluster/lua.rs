//! The Lua scripts the shared state runs in Redis. Each is atomic (Redis runs one script at a
//! time) and takes one round trip (`EVALSHA`, with `EVAL` once after a Redis restart). Times
//! come from Redis's own clock (`TIME`), so replicas with skewed clocks still agree. Numbers
//! leave the scripts as integers or strings: Redis would truncate a Lua float.

use std::sync::LazyLock;

use redis::Script;

/// GCRA over several limits at once, all or nothing. KEYS[i]: limit i's theoretical arrival
/// time, µs. ARGV[2i-1]: its emission interval, µs (a minute over the limit); ARGV[2i]: the
/// cells this request takes. The allowance is one minute's worth (a burst of the whole limit,
/// as `governor`'s `Quota::per_minute`). Reply: `{0, 0, used_1, ...}` (µs of the minute each
/// limit has used) or `{i, wait_µs}` for the first limit without room.
pub(super) static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local cost = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  local new = tat + interval * cost
  if new - now > window + 1 then
    return {i, math.floor(new - window - now)}
  end
  tats[i] = new
end
local reply = {0, 0}
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', math.floor((tats[i] - now) / 1000) + 1000)
  reply[i + 2] = math.floor(tats[i] - now)
end
return reply
",
    )
});

/// How much of each limit's minute is used (µs), taking nothing. KEYS as [`GCRA`].
pub(super) static GCRA_PEEK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local reply = {}
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  reply[i] = math.floor(tat - now)
end
return reply
",
    )
});

/// Holds an estimate on a daily budget. KEYS[1]: the budget's hash for the day, with `spent`
/// (settled USD) and one `r:ID` field per hold (`estimate:expiry_ms`); holds past their expiry
/// (a replica that died) are dropped here. ARGV: limit, estimate, hold id, hold lifetime ms.
/// Reply: `{1, spent}` held, or `{0, spent}` refused (spent as a string).
pub(super) static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local est = tonumber(ARGV[2])
local spent = 0
local held = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f, v = all[i], all[i + 1]
  if f == 'spent' then
    spent = tonumber(v)
  elseif string.sub(f, 1, 2) == 'r:' then
    local sep = string.find(v, ':', 1, true)
    local e = tonumber(string.sub(v, 1, sep - 1))
    local exp = tonumber(string.sub(v, sep + 1))
    if exp < now then redis.call('HDEL', KEYS[1], f) else held = held + e end
  end
end
if spent >= limit or spent + held + est > limit + 1e-9 then
  return {0, tostring(spent)}
end
redis.call('HSET', KEYS[1], 'r:' .. ARGV[3], ARGV[2] .. ':' .. string.format('%.0f', now + tonumber(ARGV[4])))
redis.call('PEXPIRE', KEYS[1], 172800000)
return {1, tostring(spent)}
",
    )
});

/// Publishes hold-offs and reads the live ones. KEYS[1]: 429 pauses, KEYS[2]: opened
/// breakers (hashes provider → until, Unix ms). ARGV[1]: how many of the (provider, until)
/// pairs that follow are pauses; the rest are breakers. A later end replaces an earlier one,
/// never the reverse; ended entries are deleted. Reply: `{{p, until, ...}, {p, until, ...}}`.
pub(super) static HOLD_OFF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local np = tonumber(ARGV[1])
local n = (#ARGV - 1) / 2
for i = 1, n do
  local key = KEYS[1]
  if i > np then key = KEYS[2] end
  local p, u = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local cur = tonumber(redis.call('HGET', key, p) or '0')
  if u > cur then redis.call('HSET', key, p, ARGV[2 * i + 1]) end
end
local out = {}
for k = 1, 2 do
  local live = {}
  local all = redis.call('HGETALL', KEYS[k])
  for i = 1, #all, 2 do
    if tonumber(all[i + 1]) <= now then
      redis.call('HDEL', KEYS[k], all[i])
    else
      live[#live + 1] = all[i]
      live[#live + 1] = all[i + 1]
    end
  end
  out[k] = live
end
return out
",
    )
});

/// An idempotency key's first look: the entry if there is one, else the caller's lease is
/// set (with its lifetime) and nil answered. KEYS[1]: the entry; ARGV: lease value, lease ms.
pub(super) static IDEM_BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
",
    )
});

/// Ends a lease, only if it is still the caller's: replaced by the answer (kept ARGV[3] ms) or,
/// with an empty ARGV[2], deleted. KEYS[1]: the entry; ARGV: lease value, answer, ms. Reply 1
/// when it was the caller's.
pub(super) static IDEM_FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
",
    )
});
