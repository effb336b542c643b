-- Purpose: register (or unregister) this proxy instance and count the live ones, so that local
--   fallback enforcement can divide each limit by the number of instances sharing it.
-- KEYS[1]: sorted set of instance ids scored by expiry (ms), built by shieldproxy/limits/keys.py.
-- ARGV[1]: instance id. ARGV[2]: time to live (ms). ARGV[3]: test-only clock override in ms
--   ("" in production: Redis TIME). ARGV[4]: "1" to unregister instead of registering.
-- Returns: the number of live instances (integer).

local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ttl = tonumber(ARGV[2])
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 4)
return redis.call('ZCARD', KEYS[1])
