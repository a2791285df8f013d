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
/// before it took. Work that is per key, not per request (reading limits and budgets, ending
/// holds, writing them back, expiries) is done once per batch, so a batch of many costs Redis
/// little more than one.
///
/// Redis charges each `redis.call` a few µs beyond the command itself (its arguments become
/// a client's, its reply is written as RESP and parsed back into Lua), so the script keeps
/// their number down: a budget is read with one `HMGET` (its totals and the holds the batch
/// ends) and written with one `HSET` (its totals and the new holds), and expiries are set
/// only on keys that a call creates (the keys are per day).
///
/// ARGV[1] `nk`: spend changes; ARGV[2] `na`: requests. Then per change: the hold's id it ends
/// (empty for a plain charge) and the amount it adds to `spent`. Then per request: `nr` (its
/// rate limits), `ns` (1 with a spend hold, else 0), `nu` (1 when the reply should say how
/// much of each limit is used), per rate limit its limit per minute and the cells it takes
/// (the emission interval, a minute over the limit, is worked out here), and with a hold: the
/// limit, the estimate, the hold's id and its lifetime (ms). Amounts of money arrive as
/// integers of nano-USD (1e-9 USD: integers cost the client far less to write than floats)
/// and are kept in USD. KEYS: per change its budget's hash and expiry set; then per request
/// its `nr` theoretical arrival times (µs) and, with a hold, its budget's hash and expiry set.
///
/// A rate limit's allowance is one minute's worth (a burst of the whole limit, as `governor`'s
/// `Quota::per_minute`). A budget's hash holds `spent` (settled USD), `held` (the sum of the
/// live holds' estimates) and one `r:ID` field per hold (its estimate); the expiry set (a
/// sorted set, score: expiry in Redis ms) lets the script drop holds past their expiry (a
/// replica that died) without reading every hold, so an admission costs the same whatever the
/// number of requests in flight. The set also holds the member `_` at `+inf`, which never
/// expires: the set is not deleted when its last hold ends, so it keeps the expiry it was
/// given when created.
///
/// Reply: one line per request, each a string of space-separated numbers (one bulk reply
/// parses in a fraction of what an array costs the client): `0 0 held` admitted (`held` 1
/// with a hold), followed with `nu` by `spent used_1 ...` (`spent` the budget's settled USD,
/// `used_i` µs of the minute limit i has used); `i wait_µs` when limit i has no room; `-1 0
/// spent held` when the budget has none (`held`: the estimates of the holds in flight).
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
-- The budgets the call touches, in the order first seen.
local budgets, border = {}, {}
local function budget(h, z)
  local b = budgets[h]
  if not b then
    b = {z = z, ids = {}, seen = {}, charge = 0, asked = false, fields = {}, members = {}}
    budgets[h] = b
    border[#border + 1] = h
  end
  return b
end
-- The hold `id` of budget `b` ends in this call (once, however often it is named).
local function ending(b, id)
  if not b.seen[id] then
    b.seen[id] = true
    b.ids[#b.ids + 1] = id
  end
end
-- 1. Spend changes, grouped by budget.
for j = 1, nk do
  local b = budget(KEYS[k], KEYS[k + 1])
  if ARGV[a] ~= '' then ending(b, ARGV[a]) end
  b.charge = b.charge + usd(ARGV[a + 1])
  k, a = k + 2, a + 2
end
-- 2. Where each request's arguments are; every rate limit of the batch read at once.
local asks, tat, rkeys = {}, {}, {}
for q = 1, na do
  local nr, ns = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local r = {nr = nr, ns = ns, nu = ARGV[a + 2] == '1', rk = k, ra = a + 3}
  k, a = k + nr, a + 3 + 2 * nr
  if ns == 1 then
    r.hk, r.ha = k, a
    budget(KEYS[k], KEYS[k + 1]).asked = true
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
-- 3. Each budget read once: its totals, less the holds that end (those the changes name and,
-- where a request asks for room, those past their expiry: a replica that died).
for _, h in ipairs(border) do
  local b = budgets[h]
  if b.asked then
    local expired = redis.call('ZRANGEBYSCORE', b.z, '-inf', now_ms, 'LIMIT', 0, 64)
    for i = 1, #expired do ending(b, expired[i]) end
  end
  local fields = {'spent', 'held'}
  for i = 1, #b.ids do fields[i + 2] = 'r:' .. b.ids[i] end
  local v = redis.call('HMGET', h, unpack(fields))
  b.new = not v[1] and not v[2]
  b.spent = tonumber(v[1] or '0') + b.charge
  b.held = tonumber(v[2] or '0')
  b.gone = {}
  for i = 3, #fields do
    if v[i] then
      b.held = b.held - tonumber(v[i])
      b.gone[#b.gone + 1] = fields[i]
    end
  end
  if b.held < 1e-9 then b.held = 0 end
end
-- 4. Each request in order.
local out, dirty, dorder = {}, {}, {}
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
    local b = budgets[KEYS[r.hk]]
    local limit, est = usd(ARGV[r.ha]), usd(ARGV[r.ha + 1])
    spent = b.spent
    if spent >= limit or spent + b.held + est > limit + 1e-9 then
      line = '-1 0 ' .. tostring(spent) .. ' ' .. tostring(b.held)
    else
      b.held = b.held + est
      local id = ARGV[r.ha + 2]
      b.fields[#b.fields + 1] = 'r:' .. id
      b.fields[#b.fields + 1] = num(est)
      b.members[#b.members + 1] = now_ms + tonumber(ARGV[r.ha + 3])
      b.members[#b.members + 1] = id
    end
  end
  if not line then
    for i = 1, r.nr do
      local key = KEYS[r.rk + i - 1]
      tat[key] = news[i]
      if not dirty[key] then
        dirty[key] = true
        dorder[#dorder + 1] = key
      end
    end
    if r.nu then
      local parts = {'0', '0', tostring(r.ns), tostring(spent)}
      for i = 1, r.nr do parts[4 + i] = string.format('%d', math.floor(news[i] - now)) end
      line = table.concat(parts, ' ')
    elseif r.ns == 1 then
      line = '0 0 1'
    else
      line = '0 0 0'
    end
  end
  out[q] = line
end
-- 5. What the batch took and ended, written once per key.
for _, key in ipairs(dorder) do
  redis.call('SET', key, string.format('%.0f', tat[key]), 'PX', math.floor((tat[key] - now) / 1000) + 1000)
end
for _, h in ipairs(border) do
  local b = budgets[h]
  if #b.gone > 0 then redis.call('HDEL', h, unpack(b.gone)) end
  local set = b.fields
  if b.charge > 0 then
    set[#set + 1] = 'spent'
    set[#set + 1] = num(b.spent)
  end
  if #b.gone > 0 or #b.members > 0 then
    set[#set + 1] = 'held'
    set[#set + 1] = num(b.held)
  end
  if #set > 0 then
    redis.call('HSET', h, unpack(set))
    -- A plain charge, or an end of a hold Redis lost (a restart), may create the hash.
    if b.new then redis.call('PEXPIRE', h, DAY2) end
  end
  if #b.ids > 0 then redis.call('ZREM', b.z, unpack(b.ids)) end
  if #b.members > 0 then
    local n = #b.members / 2
    b.members[#b.members + 1] = '+inf'
    b.members[#b.members + 1] = '_'
    -- The set is new when `_` was added with the holds.
    if redis.call('ZADD', b.z, unpack(b.members)) > n then redis.call('PEXPIRE', b.z, DAY2) end
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
/// breakers (hashes provider → until, Unix ms), KEYS[3]: resets by hand (provider → when, Unix
/// ms, kept an hour). ARGV[1]: how many of the (provider, until, reset seen) triples that
/// follow are pauses; the rest are breakers. A triple whose provider has a later reset than the
/// one its replica had seen is dropped (learnt before the reset reached it). A later end
/// replaces an earlier one, never the reverse; ended entries are deleted. Reply: `{{p, until,
/// ...}, {p, until, ...}, {p, when, ...}}`.
pub(super) static HOLD_OFF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local np = tonumber(ARGV[1])
local n = (#ARGV - 1) / 3
for i = 1, n do
  local key = KEYS[1]
  if i > np then key = KEYS[2] end
  local at = 3 * i - 1
  local p, u, seen = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local reset = tonumber(redis.call('HGET', KEYS[3], p) or '0')
  if reset <= seen then
    local cur = tonumber(redis.call('HGET', key, p) or '0')
    if u > cur then redis.call('HSET', key, p, ARGV[at + 1]) end
  end
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
local resets = {}
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) <= now - 3600000 then
    redis.call('HDEL', KEYS[3], all[i])
  else
    resets[#resets + 1] = all[i]
    resets[#resets + 1] = all[i + 1]
  end
end
out[3] = resets
return out
",
    )
});

/// Lifts a provider's hold-offs by hand: deletes its 429 pause and opened breaker and records
/// the reset, which every replica applies at its next exchange ([`HOLD_OFF`]). KEYS: pauses,
/// breakers, resets (as there); ARGV[1]: the provider. Reply: the reset's time, Unix ms.
pub(super) static RESET_HOLD_OFFS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local cur = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if now <= cur then now = cur + 1 end
redis.call('HSET', KEYS[3], ARGV[1], now)
return now
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

/// Renews a lease while its leader runs, only if it is still the caller's. KEYS[1]: the entry;
/// ARGV: lease value, lease ms. Reply 1 when it was renewed.
pub(super) static IDEM_RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
",
    )
});
