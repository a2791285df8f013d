//! The Lua scripts the shared state runs in Redis. Each is atomic (Redis runs one script at a
//! time) and takes one round trip (`EVALSHA`, with `EVAL` once after a Redis restart). Times
//! come from Redis's own clock (`TIME`), so replicas with skewed clocks still agree. Numbers
//! leave the scripts as integers or strings: Redis would truncate a Lua float.

use std::sync::LazyLock;

use redis::Script;

/// A request's admission in one round trip: spend changes that waited for a call, then every
/// rate limit (GCRA, all or nothing), then a hold on a daily budget. Rate limits and the hold
/// are taken together or not at all.
///
/// ARGV[1] `nr`: rate limits; ARGV[2] `ns`: 1 with a spend hold, else 0; ARGV[3] `nk`: spend
/// changes. KEYS: `nr` theoretical arrival times (µs); with a hold, the budget's hash and its
/// expiry set; per change, the same two keys of its budget. After the counts, ARGV holds per
/// rate limit its emission interval (µs: a minute over the limit) and the cells the request
/// takes; with a hold: the limit (USD), the estimate, the hold's id, its lifetime (ms); per
/// change: the hold's id it ends (empty for a plain charge) and the USD it adds to `spent`.
///
/// A rate limit's allowance is one minute's worth (a burst of the whole limit, as `governor`'s
/// `Quota::per_minute`). A budget's hash holds `spent` (settled USD), `held` (the sum of the
/// live holds' estimates) and one `r:ID` field per hold (its estimate); the expiry set (a
/// sorted set, score: expiry in Redis ms) lets the script drop holds past their expiry (a
/// replica that died) without reading every hold, so an admission costs the same whatever the
/// number of requests in flight.
///
/// Reply: one string of space-separated numbers (one bulk reply parses in a fraction of what an
/// array of them costs the client): `0 0 held spent used_1 ...` admitted (`held` 1 with a hold,
/// `spent` the budget's settled USD, `used_i` µs of the minute limit i has used); `i wait_µs`
/// when limit i has no room; `-1 0 spent` when the budget has none.
pub(super) static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local nr, ns, nk = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local DAY2 = 172800000
-- Ends hold `id` of the budget (hash `h`, expiry set `z`): its estimate leaves `held`.
-- Whether the hold was still there.
local function release(h, z, id)
  local f = 'r:' .. id
  local est = redis.call('HGET', h, f)
  if est then
    redis.call('HDEL', h, f)
    local left = tonumber(redis.call('HINCRBYFLOAT', h, 'held', '-' .. est))
    if left < 1e-9 then redis.call('HSET', h, 'held', '0') end
  end
  redis.call('ZREM', z, id)
  return est
end
local a = 4 + 2 * nr + 4 * ns
local k = nr + 2 * ns
for j = 1, nk do
  local h, z = KEYS[k + 2 * j - 1], KEYS[k + 2 * j]
  -- A live hold's hash got its expiry when the hold was taken; a plain charge, or a hold
  -- that Redis lost (a restart), may create it here.
  local held = ARGV[a] ~= '' and release(h, z, ARGV[a])
  if tonumber(ARGV[a + 1]) > 0 then redis.call('HINCRBYFLOAT', h, 'spent', ARGV[a + 1]) end
  if not held then redis.call('PEXPIRE', h, DAY2) end
  a = a + 2
end
local window = 60000000
local tats = {}
local cur = {}
if nr > 0 then cur = redis.call('MGET', unpack(KEYS, 1, nr)) end
for i = 1, nr do
  local interval = tonumber(ARGV[2 + 2 * i])
  local cost = tonumber(ARGV[3 + 2 * i])
  local tat = tonumber(cur[i] or '0')
  if tat < now then tat = now end
  local new = tat + interval * cost
  if new - now > window + 1 then
    return string.format('%d %d', i, math.floor(new - window - now))
  end
  tats[i] = new
end
local spent = 0
if ns == 1 then
  local h, z = KEYS[nr + 1], KEYS[nr + 2]
  local b = 4 + 2 * nr
  local limit, est = tonumber(ARGV[b]), tonumber(ARGV[b + 1])
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now_ms, 'LIMIT', 0, 64)) do
    release(h, z, id)
  end
  local v = redis.call('HMGET', h, 'spent', 'held')
  spent = tonumber(v[1] or '0')
  local held = tonumber(v[2] or '0')
  if spent >= limit or spent + held + est > limit + 1e-9 then
    return '-1 0 ' .. tostring(spent)
  end
  redis.call('HSET', h, 'r:' .. ARGV[b + 2], ARGV[b + 1])
  redis.call('HINCRBYFLOAT', h, 'held', ARGV[b + 1])
  redis.call('ZADD', z, now_ms + tonumber(ARGV[b + 3]), ARGV[b + 2])
  redis.call('PEXPIRE', h, DAY2)
  redis.call('PEXPIRE', z, DAY2)
end
local reply = {0, 0, ns, tostring(spent)}
for i = 1, nr do
  redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', math.floor((tats[i] - now) / 1000) + 1000)
  reply[i + 4] = string.format('%d', math.floor(tats[i] - now))
end
return table.concat(reply, ' ')
",
    )
});

/// How much of each limit's minute is used (µs), taking nothing. KEYS: the limits' theoretical arrival times, as in [`ADMIT`].
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
