-- Purpose: register (or unregister) this proxy instance and count the live ones, so that local
--   fallback enforcement can divide each limit by the number of instances sharing it.
-- KEYS[1]: sorted set of instance ids scored by expiry (ms), built by shieldproxy/limits/keys.py.
-- ARGV[1]: instance id. ARGV[2]: time to live (ms). ARGV[3]: test-only clock override in ms
--   ("" in production: Redis TIME). ARGV[4]: "1" to unregister instead of registering.
-- Returns: {the number of live instances, 1 if this instance was not in the set before this
--   call, else 0}. Absent on a beat that is not its first: Redis lost its data (restarted
--   empty, or this instance was away for longer than its TTL).

local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ttl = tonumber(ARGV[2])
local absent = 0
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if not score or tonumber(score) <= now then absent = 1 end
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 4)
return {redis.call('ZCARD', KEYS[1]), absent}
