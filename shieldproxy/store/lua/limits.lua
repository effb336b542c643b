-- Purpose: evaluate and consume rate limits and quotas for one or more requests in one atomic
--   call. Per request, all-or-nothing: if every non-shadow call admits, each admitting call is
--   consumed (and each shadow quota call, whose overage is billed); otherwise nothing is. Shadow
--   calls never block. Requests are applied in order, so request 2 sees what request 1 consumed
--   (this is how coalesced requests share a call).
--   Semantics are mirrored exactly by shieldproxy/limits/algorithms.py (the Python twin).
-- KEYS[i]: state key of the i-th call across all requests, built by shieldproxy/limits/keys.py
--   (a hash for fixed/sliding window, a string for token_bucket and quota, a sorted set for
--   sliding_log and concurrency).
-- ARGV[1]: test-only clock override in whole milliseconds; "" in production, where the time
--   comes from Redis TIME so that every proxy instance agrees.
-- ARGV[2]: mode: "acquire" | "charge" (consume unconditionally) | "release" (drop concurrency
--   leases) | "renew" (hold concurrency leases of requests still in flight until window ms from now) | "refund" (give back units consumed earlier: a cluster request denied on another
--   shard, or reserved units not spent; token_bucket gives back only what time has not).
-- ARGV[3..]: one string per request (the number of requests is #ARGV - 2), holding that
--   request's calls back to back, in KEYS order, each as one record (built by
--   shieldproxy/store/scripts.py; numbers are decimal text):
--     strategy,limit,window,burst,shadow,period_end,cost,stamp,extra,size:token
--   strategy name; limit (count); window (ms); burst (count); shadow ("1" | "0");
--   period end (quota only: absolute epoch ms, wall clock, when the billing period ends; else
--   "0"); cost (count); stamp (window start in ms, refund only, else "0"); extra (units the
--   caller would like to reserve beyond cost, see "Reservations" below; else "0"); size (bytes
--   of the token that follows); token (unique per request: names log entries and leases; any
--   bytes). The first six fields are per-rule constants, so the client caches them as one
--   fragment. Example (two calls):
--   "fixed_window,100,60000,100,0,0,1,0,0,6:ab12:7"
--   .. "token_bucket,5,1000,10,0,0,1,0,0,6:ab12:7"
-- Reservations: when a request is admitted, each fixed_window, sliding_window, token_bucket or
--   quota call is also granted up to `extra` more units, never more than 1/GRANT_SHARE of what
--   is left once every request of this call was applied, and those units are consumed. The proxy spends them on
--   later requests without a round trip and gives back what it did not spend ("refund").
--   Reserved units are always counted first, so reservations can under-admit for a moment but
--   never over-admit.
-- Returns: "acquire": a flat array with 7 integers per call in KEYS order: allowed (1|0),
--   remaining (count), reset (ms, rounded up), retry (ms until it would admit, 0 if allowed),
--   stamp (window start in ms for fixed/sliding window; for a token_bucket grant the arrival
--   time after it, floored; else 0), used (quota: units counted
--   this period, overage included; else 0), granted (extra units reserved and consumed, 0 when
--   denied). Other modes: an empty array.

local override = ARGV[1]
local mode = ARGV[2]
local now
if override ~= '' then
  now = tonumber(override)
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Expiry is garbage collection only: every decision reads the stored window stamps, so a key
-- outliving its window is harmless. Under a test clock keep keys an hour so that real-time
-- expiry never races the fake time.
local slack = 1000
if override ~= '' then slack = 3600000 end

local function oldest_score(key, index)
  local o = redis.call('ZRANGE', key, index, index, 'WITHSCORES')
  if o[2] then return tonumber(o[2]) end
  return nil
end

local eval, commit, refund = {}, {}, {}

eval.fixed_window = function(c)
  local v = redis.call('HMGET', c.key, 'w', 'n')
  local ws = now - (now % c.window)
  local n = 0
  if tonumber(v[1]) == ws then n = tonumber(v[2]) or 0 end
  local st = {ws = ws, n = n, stamp = ws}
  st.ok = n + c.cost <= c.limit
  st.rem = math.max(0, c.limit - n)
  st.reset = ws + c.window - now
  st.retry = 0
  if not st.ok then st.retry = st.reset end
  return st
end
commit.fixed_window = function(c, st)
  local n = st.n + c.cost
  redis.call('HSET', c.key, 'w', st.ws, 'n', n)
  redis.call('PEXPIRE', c.key, st.ws + c.window - now + slack)
  st.rem = math.max(0, c.limit - n)
end
refund.fixed_window = function(c)
  if tonumber(redis.call('HGET', c.key, 'w')) == c.stamp then
    if redis.call('HINCRBY', c.key, 'n', -c.cost) < 0 then redis.call('HSET', c.key, 'n', 0) end
  end
end

-- Weighted two-window counter: the previous window's count is assumed spread evenly. O(1)
-- memory; any one-window interval admits at most 2 x limit (see algorithms.py for the bound).
local function sw_retry(c, cur, prev, e)
  local W = c.window
  if c.cost > c.limit then return W - e end
  local a = c.limit - cur - c.cost
  if a >= 0 then
    -- denied with room in the current window: wait until the previous window's weight fades
    -- (admitted once ceil(prev * (W - e) / W) <= a)
    return W - math.floor(a * W / prev) - e
  end
  -- the current window alone is over: in the next one it is the previous, weighed down
  local emin = W - math.floor((c.limit - c.cost) * W / cur)
  if emin < 0 then emin = 0 end
  return W - e + emin
end
eval.sliding_window = function(c)
  local W = c.window
  local v = redis.call('HMGET', c.key, 'w', 'c', 'p')
  local cw = now - (now % W)
  local sw = tonumber(v[1])
  local cur, prev = 0, 0
  if sw == cw then
    cur = tonumber(v[2]) or 0
    prev = tonumber(v[3]) or 0
  elseif sw == cw - W then
    prev = tonumber(v[2]) or 0
  end
  local e = now - cw
  -- rounded up: a full window denies until enough of it has faded (see algorithms.py)
  local weighted = math.ceil(prev * (W - e) / W) + cur
  local st = {cw = cw, cur = cur, prev = prev, weighted = weighted, stamp = cw}
  st.ok = weighted + c.cost <= c.limit
  st.rem = math.max(0, c.limit - weighted)
  st.reset = W - e
  st.retry = 0
  if not st.ok then st.retry = sw_retry(c, cur, prev, e) end
  return st
end
commit.sliding_window = function(c, st)
  redis.call('HSET', c.key, 'w', st.cw, 'c', st.cur + c.cost, 'p', st.prev)
  redis.call('PEXPIRE', c.key, st.cw + 2 * c.window - now + slack)
  st.rem = math.max(0, c.limit - st.weighted - c.cost)
end
refund.sliding_window = function(c)
  local w = tonumber(redis.call('HGET', c.key, 'w'))
  local field = nil
  if w == c.stamp then field = 'c' elseif w == c.stamp + c.window then field = 'p' end
  if field and redis.call('HINCRBY', c.key, field, -c.cost) < 0 then
    redis.call('HSET', c.key, field, 0)
  end
end

-- Exact log: one sorted-set member per unit of cost, scored by its time (ms).
local function zset_eval(c, horizon)
  redis.call('ZREMRANGEBYSCORE', c.key, '-inf', horizon)
  local n = redis.call('ZCARD', c.key)
  local st = {n = n, stamp = 0}
  st.ok = n + c.cost <= c.limit
  st.rem = math.max(0, c.limit - n)
  st.retry = 0
  if not st.ok then
    if c.cost > c.limit then
      st.retry = c.window
    else
      st.retry = oldest_score(c.key, n + c.cost - c.limit - 1) - horizon
    end
  end
  return st
end
local function zset_add(c, score, count)
  for i = 1, count do redis.call('ZADD', c.key, score, c.token .. ':' .. i) end
  redis.call('PEXPIRE', c.key, c.window + slack)
end
local function zset_remove(c)
  for i = 1, c.cost do redis.call('ZREM', c.key, c.token .. ':' .. i) end
end
-- The caller renews only leases whose requests are still in flight, so a lease that is gone
-- (expired while its instance stalled, or lost when Redis restarted empty) is put back: the
-- count must say how many requests really run, even if that is over the limit for a while.
local function zset_renew(c)
  redis.call('ZREMRANGEBYSCORE', c.key, '-inf', now)
  for i = 1, c.cost do
    redis.call('ZADD', c.key, now + c.window, c.token .. ':' .. i)
  end
  redis.call('PEXPIRE', c.key, c.window + slack)
end

eval.sliding_log = function(c)
  local st = zset_eval(c, now - c.window)
  local o = oldest_score(c.key, 0)
  st.reset = 0
  if o then st.reset = o + c.window - now end
  return st
end
commit.sliding_log = function(c, st)
  zset_add(c, now, c.cost)
  st.rem = math.max(0, c.limit - st.n - c.cost)
  st.reset = oldest_score(c.key, 0) + c.window - now
end
refund.sliding_log = zset_remove

-- Concurrency: one member per unit in flight, scored by lease expiry (ms), so that slots held
-- by a crashed instance free themselves.
local function cc_reset(c, used)
  if used < c.limit then return 0 end
  return oldest_score(c.key, 0) - now
end
eval.concurrency = function(c)
  local st = zset_eval(c, now)
  st.reset = cc_reset(c, st.n)
  return st
end
commit.concurrency = function(c, st)
  zset_add(c, now + c.window, c.cost)
  st.rem = math.max(0, c.limit - st.n - c.cost)
  st.reset = cc_reset(c, st.n + c.cost)
end
refund.concurrency = zset_remove

-- GCRA: the stored value is the theoretical arrival time (ms, float) of the next unit.
local function tb_state(c, tat)
  local I = c.window / c.limit
  local tau = c.burst * I
  return math.max(0, math.floor((tau - (tat - now)) / I + 1e-9)),
         math.ceil(math.max(0, tat - tau + I - now))
end
eval.token_bucket = function(c)
  local I = c.window / c.limit
  local tau = c.burst * I
  local tat = tonumber(redis.call('GET', c.key)) or now
  if tat < now then tat = now end
  local new = tat + c.cost * I
  local st = {tat = tat, new = new, stamp = 0}
  st.ok = new - tau <= now
  st.rem, st.reset = tb_state(c, tat)
  st.retry = 0
  if not st.ok then st.retry = math.ceil(new - tau - now) end
  return st
end
commit.token_bucket = function(c, st)
  redis.call('SET', c.key, string.format('%.17g', st.new), 'PX', math.ceil(st.new - now) + slack)
  st.rem, st.reset = tb_state(c, st.new)
end
refund.token_bucket = function(c)
  local tat = tonumber(redis.call('GET', c.key))
  if tat then
    local I = c.window / c.limit
    local units = c.cost
    if c.stamp > 0 then
      -- reserved units: past `stamp` (the arrival time right after the grant) the bucket has
      -- refilled them by itself, so only the part still ahead of now may be given back
      units = math.min(units, math.max(0, math.floor((c.stamp - now) / I)))
    end
    if units > 0 then
      redis.call('SET', c.key, string.format('%.17g', tat - units * I), 'KEEPTTL')
    end
  end
end

-- Quota: a plain counter per billing period. The period is part of the key (the caller's
-- subject carries its start), so nothing here resets it; the period end only says how long
-- until a fresh counter, and the key is kept 40 days past it for usage export and billing.
local QUOTA_KEEP_MS = 40 * 86400000
eval.quota = function(c)
  local n = tonumber(redis.call('GET', c.key)) or 0
  local st = {stamp = 0, used = n}
  st.ok = n + c.cost <= c.limit
  st.rem = math.max(0, c.limit - n)
  st.reset = math.max(0, c.period_end - now)
  st.retry = 0
  if not st.ok then st.retry = st.reset end
  return st
end
commit.quota = function(c, st)
  local n = redis.call('INCRBY', c.key, c.cost)
  local keep = math.max(c.period_end, now) + QUOTA_KEEP_MS
  if override ~= '' then
    -- a fake clock lives in the past: an absolute expiry would delete the key at once
    redis.call('PEXPIRE', c.key, string.format('%.0f', keep - now))
  else
    redis.call('PEXPIREAT', c.key, string.format('%.0f', keep))
  end
  st.used = n
  st.rem = math.max(0, c.limit - n)
end
refund.quota = function(c)
  if redis.call('EXISTS', c.key) == 1 and redis.call('DECRBY', c.key, c.cost) < 0 then
    redis.call('SET', c.key, 0, 'KEEPTTL')
  end
end

-- Reservations (see the header): how many of the `extra` units asked for a call can be granted
-- on top of its cost, given the evaluation `st` of an admitted request. Others get none.
local GRANT_SHARE = 16
local available = {}
available.fixed_window = function(c, st) return c.limit - st.n - c.cost end
available.sliding_window = function(c, st) return c.limit - st.weighted - c.cost end
available.quota = function(c, st) return c.limit - st.used - c.cost end
available.token_bucket = function(c, st)
  local I = c.window / c.limit
  return math.floor((c.burst * I - (st.new - now)) / I + 1e-9)
end
-- `st` evaluates c with cost 0, after every request of the call was applied.
local function grant(c, st)
  local avail = available[c.strategy]
  if not st.ok then return 0 end
  local g = math.min(c.extra, math.floor(avail(c, st) / GRANT_SHARE))
  if g <= 0 then return 0 end
  if c.strategy == 'token_bucket' then st.new = st.new + g * (c.window / c.limit) end
  return g
end

-- One call record: 9 comma-terminated fields, then the token's size in bytes, ':' and the token
-- itself (any bytes, so it is sized rather than delimited).
local RECORD = '^([^,]*),([^,]*),([^,]*),([^,]*),([^,]*),([^,]*),([^,]*),([^,]*),([^,]*),(%d+):'
local find, sub = string.find, string.sub

-- Parse every request before touching any key: a malformed record fails the whole call cleanly.
local requests = {}
local ki = 1
for ri = 3, #ARGV do
  local packed = ARGV[ri]
  local calls, pos = {}, 1
  while pos <= #packed do
    local _, e, strategy, limit, window, burst, shadow, period_end, cost, stamp, extra, size =
      find(packed, RECORD, pos)
    if not e then return redis.error_reply('limits.lua: malformed call record') end
    local tend = e + tonumber(size)
    calls[#calls + 1] = {
      key = KEYS[ki], strategy = strategy, limit = tonumber(limit), window = tonumber(window),
      burst = tonumber(burst), cost = tonumber(cost), shadow = shadow == '1',
      token = sub(packed, e + 1, tend), stamp = tonumber(stamp),
      period_end = tonumber(period_end), extra = tonumber(extra),
    }
    ki, pos = ki + 1, tend + 1
  end
  requests[#requests + 1] = calls
end
if ki - 1 ~= #KEYS then return redis.error_reply('limits.lua: KEYS and records disagree') end

local out, reserving = {}, {}
for _, calls in ipairs(requests) do
  local ncalls = #calls
  local sts = {}
  local admit = true
  for j = 1, ncalls do
    local c = calls[j]
    if mode == 'release' then
      if c.strategy == 'concurrency' then zset_remove(c) end
    elseif mode == 'renew' then
      if c.strategy == 'concurrency' then zset_renew(c) end
    elseif mode == 'refund' then
      refund[c.strategy](c)
    elseif mode == 'charge' then
      if c.strategy ~= 'concurrency' and c.cost > 0 then
        local st = eval[c.strategy](c)
        -- a log entry per unit beyond the limit adds nothing but memory
        if c.strategy == 'sliding_log' then
          zset_add(c, now, math.min(c.cost, c.limit))
        else
          commit[c.strategy](c, st)
        end
      end
    else
      local st = eval[c.strategy](c)
      sts[j] = st
      if not st.ok and not c.shadow then admit = false end
    end
  end
  if mode == 'acquire' then
    for j = 1, ncalls do
      local c, st = calls[j], sts[j]
      -- a shadow quota (overage allowed) counts past its limit: overage is billed
      local counts = st.ok or (c.shadow and c.strategy == 'quota')
      if admit and counts then
        if c.cost > 0 then commit[c.strategy](c, st) end
        if c.extra > 0 and st.ok and available[c.strategy] then
          reserving[#reserving + 1] = {c = c, at = #out}
        end
      end
      local allowed = 0
      if st.ok then allowed = 1 end
      out[#out + 1] = allowed
      out[#out + 1] = st.rem
      out[#out + 1] = st.reset
      out[#out + 1] = st.retry
      out[#out + 1] = st.stamp
      out[#out + 1] = st.used or 0
      out[#out + 1] = 0  -- granted, see below
    end
  end
end

-- Reservations are granted last, from what every request of this call left over: a request
-- later in the same call must never be denied for units reserved by an earlier one.
for _, r in ipairs(reserving) do
  local c = r.c
  c.cost = 0
  local st = eval[c.strategy](c)
  local g = grant(c, st)
  if g > 0 then
    c.cost = g
    commit[c.strategy](c, st)
    out[r.at + 2] = st.rem
    if c.strategy == 'token_bucket' then out[r.at + 5] = math.floor(st.new) end
    out[r.at + 6] = st.used or 0
    out[r.at + 7] = g
  end
end
return out
