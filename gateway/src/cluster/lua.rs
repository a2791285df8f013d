//! The Lua scripts the shared state runs in Redis. Each is atomic (Redis runs one script at a
//! time) and takes one round trip (`EVALSHA`, with `EVAL` once after a Redis restart). Times
//! come from Redis's own clock (`TIME`), so replicas with skewed clocks still agree. Numbers
//! leave the scripts as integers or strings: Redis would truncate a Lua float.

use std::sync::LazyLock;

use redis::Script;

/// The admissions of one or more requests in one round trip (a batch: the requests of one
/// proxy worker that arrived while its previous call was out), after the spend changes that
/// waited for a call. Each request's rate limits (GCRA) and its hold on a daily budget are
/// taken together or not at all; requests are decided in order, each seeing what the ones
/// before it took. Work that is per key, not per request (reading limits and budgets, writing
/// them back, expiries) is done once per batch, so a batch of many costs Redis little more
/// than one.
///
/// ARGV[1] `nk`: spend changes; ARGV[2] `na`: requests. Then per change: the hold's id it ends
/// (empty for a plain charge) and the amount it adds to `spent`. Then per request: `nr` (its
/// rate limits), `ns` (1 with a spend hold, else 0), per rate limit its limit per minute and
/// the cells it takes (the emission interval, a minute over the limit, is worked out here),
/// and with a hold: the limit, the estimate, the hold's id and its lifetime (ms). Amounts of
/// money arrive as integers of nano-USD (1e-9 USD: integers cost the client far less to write
/// than floats) and are kept in USD. KEYS: per change its budget's hash and expiry
/// set; then per request its `nr` theoretical arrival times (µs) and, with a hold, its budget's
/// hash and expiry set.
///
/// A rate limit's allowance is one minute's worth (a burst of the whole limit, as `governor`'s
/// `Quota::per_minute`). A budget's hash holds `spent` (settled USD), `held` (the sum of the
/// live holds' estimates) and one `r:ID` field per hold (its estimate); the expiry set (a
/// sorted set, score: expiry in Redis ms) lets the script drop holds past their expiry (a
/// replica that died) without reading every hold, so an admission costs the same whatever the
/// number of requests in flight.
///
/// Reply: one line per request, each a string of space-separated numbers (one bulk reply
/// parses in a fraction of what an array costs the client): `0 0 held spent used_1 ...`
/// admitted (`held` 1 with a hold, `spent` the budget's settled USD, `used_i` µs of the minute
/// limit i has used); `i wait_µs` when limit i has no room; `-1 0 spent` when the budget has
/// none.
pub(super) static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local DAY2 = 172800000
local window = 60000000
local a, k = 3, 1
local function num(x) return string.format('%.17g', x) end
local function usd(x) return tonumber(x) / 1e9 end
-- Ends the holds `ids` of the budget (hash `h`, expiry set `z`): their estimates leave `held`.
-- Returns how many were still there (a hold may be gone: expired, or lost by Redis).
local function release(h, z, ids)
  if #ids == 0 then return 0 end
  local fields = {}
  for i = 1, #ids do fields[i] = 'r:' .. ids[i] end
  local ests = redis.call('HMGET', h, unpack(fields))
  local sum, found = 0, 0
  for i = 1, #fields do
    if ests[i] then
      sum = sum + tonumber(ests[i])
      found = found + 1
    end
  end
  if found > 0 then
    redis.call('HDEL', h, unpack(fields))
    local left = tonumber(redis.call('HINCRBYFLOAT', h, 'held', num(-sum)))
    if left < 1e-9 then redis.call('HSET', h, 'held', '0') end
  end
  redis.call('ZREM', z, unpack(ids))
  return found
end
-- 1. Spend changes, grouped by budget.
local changed, corder = {}, {}
for j = 1, nk do
  local h = KEYS[k]
  local c = changed[h]
  if not c then
    c = {z = KEYS[k + 1], ids = {}, usd = 0}
    changed[h] = c
    corder[#corder + 1] = h
  end
  if ARGV[a] ~= '' then c.ids[#c.ids + 1] = ARGV[a] end
  c.usd = c.usd + usd(ARGV[a + 1])
  k, a = k + 2, a + 2
end
for _, h in ipairs(corder) do
  local c = changed[h]
  local found = release(h, c.z, c.ids)
  if c.usd > 0 then redis.call('HINCRBYFLOAT', h, 'spent', num(c.usd)) end
  -- A live hold's hash got its expiry when the hold was taken; a plain charge, or a hold
  -- that Redis lost (a restart), may create it here.
  if found < #c.ids or #c.ids == 0 then redis.call('PEXPIRE', h, DAY2) end
end
-- 2. Where each request's arguments are; every rate limit of the batch read at once.
local asks, tat, rkeys = {}, {}, {}
for q = 1, na do
  local nr, ns = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local r = {nr = nr, ns = ns, rk = k, ra = a + 2}
  k, a = k + nr, a + 2 + 2 * nr
  if ns == 1 then
    r.hk, r.ha = k, a
    k, a = k + 2, a + 4
  end
  for i = 0, nr - 1 do
    local key = KEYS[r.rk + i]
    if tat[key] == nil then
      tat[key] = 0
      rkeys[#rkeys + 1] = key
    end
  end
  asks[q] = r
end
if #rkeys > 0 then
  local cur = redis.call('MGET', unpack(rkeys))
  for i = 1, #rkeys do tat[rkeys[i]] = tonumber(cur[i] or '0') end
end
-- 3. Each request in order.
local out, dirty, dorder, budgets, border = {}, {}, {}, {}, {}
for q = 1, na do
  local r = asks[q]
  local news, line = {}, nil
  for i = 1, r.nr do
    local key = KEYS[r.rk + i - 1]
    local cur = tat[key]
    if cur < now then cur = now end
    local new = cur + window / tonumber(ARGV[r.ra + 2 * i - 2]) * tonumber(ARGV[r.ra + 2 * i - 1])
    if new - now > window + 1 then
      line = string.format('%d %d', i, math.floor(new - window - now))
      break
    end
    news[i] = new
  end
  local spent = 0
  if not line and r.ns == 1 then
    local h = KEYS[r.hk]
    local b = budgets[h]
    if not b then
      local z = KEYS[r.hk + 1]
      release(h, z, redis.call('ZRANGEBYSCORE', z, '-inf', now_ms, 'LIMIT', 0, 64))
      local v = redis.call('HMGET', h, 'spent', 'held')
      b = {z = z, spent = tonumber(v[1] or '0'), held = tonumber(v[2] or '0'), add = 0, fields = {}, members = {}}
      budgets[h] = b
      border[#border + 1] = h
    end
    local limit, est = usd(ARGV[r.ha]), usd(ARGV[r.ha + 1])
    spent = b.spent
    if spent >= limit or spent + b.held + est > limit + 1e-9 then
      line = '-1 0 ' .. tostring(spent)
    else
      b.held = b.held + est
      b.add = b.add + est
      local id = ARGV[r.ha + 2]
      b.fields[#b.fields + 1] = 'r:' .. id
      b.fields[#b.fields + 1] = num(est)
      b.members[#b.members + 1] = now_ms + tonumber(ARGV[r.ha + 3])
      b.members[#b.members + 1] = id
    end
  end
  if not line then
    local parts = {'0', '0', tostring(r.ns), tostring(spent)}
    for i = 1, r.nr do
      local key = KEYS[r.rk + i - 1]
      tat[key] = news[i]
      if not dirty[key] then
        dirty[key] = true
        dorder[#dorder + 1] = key
      end
      parts[4 + i] = string.format('%d', math.floor(news[i] - now))
    end
    line = table.concat(parts, ' ')
  end
  out[q] = line
end
-- 4. What the batch took, written once per key.
for _, key in ipairs(dorder) do
  redis.call('SET', key, string.format('%.0f', tat[key]), 'PX', math.floor((tat[key] - now) / 1000) + 1000)
end
for _, h in ipairs(border) do
  local b = budgets[h]
  if #b.fields > 0 then
    redis.call('HSET', h, unpack(b.fields))
    redis.call('HINCRBYFLOAT', h, 'held', num(b.add))
    redis.call('ZADD', b.z, unpack(b.members))
    redis.call('PEXPIRE', h, DAY2)
    redis.call('PEXPIRE', b.z, DAY2)
  end
end
return table.concat(out, '\n')
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
