-- Index a batch of groups whose bytes the same MULTI transaction has just written with
-- SET NX to their payload keys (so payloads never pass through Lua). ARGV: producer,
-- capacity_groups, capacity_bytes, overflow ('block'|'drop_oldest'), dedup_window_ms,
-- producer_key, then five values per group: id, min_version, max_version, n_tokens,
-- lease ('' without admission).
-- Returns one status per group: 'ok', 'duplicate' or 'full' (that group not written).
local producer, capacity_groups, capacity_bytes = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local overflow, dedup_window_ms, producer_key = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', K_ACKED, '-inf', now - dedup_window_ms)

local stored_groups = redis.call('ZCARD', K_LIVE)
local stored_bytes = tonumber(redis.call('HGET', K_COUNTERS, 'bytes') or '0')
local added_bytes, added_tokens, added, duplicates, max_version = 0, 0, 0, 0, nil
local used_leases, returned_leases, statuses = {}, 0, {}

local function fits(size)
  return stored_groups + 1 <= capacity_groups and stored_bytes + size <= capacity_bytes
end

for i = 7, #ARGV, 5 do
  local id, min_version, version = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local n_tokens, lease = tonumber(ARGV[i + 3]), ARGV[i + 4]
  local key = payload_key(id)
  local status = 'ok'
  -- A retried put of a group that is stored, or was acked recently, is not stored twice.
  -- A stored group's bytes were left alone by SET NX; a tombstoned one's were just written.
  if redis.call('ZSCORE', K_LIVE, id) then
    status = 'duplicate'
  elseif redis.call('ZSCORE', K_ACKED, id) then
    status = 'duplicate'
    redis.call('DEL', key)
  end
  if status == 'duplicate' then
    duplicates = duplicates + 1
    if lease ~= '' and redis.call('ZREM', K_LEASES, lease) == 1 then
      returned_leases = returned_leases + 1
    end
  else
    local size = redis.call('STRLEN', key)
    -- Evict the oldest ready groups when allowed (never claimed ones: a learner has them).
    while not fits(size) and overflow == 'drop_oldest' do
      local oldest = redis.call('ZRANGE', K_READY, 0, 0)
      if #oldest == 0 then break end
      stored_bytes = stored_bytes - remove_entries(oldest)
      stored_groups = stored_groups - 1
      redis.call('HINCRBY', K_COUNTERS, 'dropped_capacity', 1)
      returned_leases = returned_leases + 1
    end
    if not fits(size) then
      status = 'full'
      redis.call('DEL', key)
    else
      redis.call('ZADD', K_READY, min_version, id)
      redis.call('ZADD', K_LIVE, min_version, id)
      redis.call('HINCRBY', K_VCOUNT, min_version, 1)
      stored_groups, stored_bytes = stored_groups + 1, stored_bytes + size
      added, added_bytes, added_tokens = added + 1, added_bytes + size, added_tokens + n_tokens
      max_version = math.max(max_version or version, version)
      if lease ~= '' then table.insert(used_leases, lease) end
    end
  end
  table.insert(statuses, status)
end

if #used_leases > 0 then call_chunked('ZREM', K_LEASES, used_leases) end
release_admission(returned_leases)
if duplicates > 0 then redis.call('HINCRBY', K_COUNTERS, 'duplicates', duplicates) end
if added > 0 then
  redis.call('HINCRBY', K_COUNTERS, 'bytes', added_bytes)
  redis.call('HINCRBY', K_COUNTERS, 'put', added)
  redis.call('HINCRBY', K_COUNTERS, 'put_tokens', added_tokens)
  redis.call('HINCRBY', K_COUNTERS, 'put_bytes', added_bytes)
  redis.call('SADD', K_PRODUCERS, producer)
  redis.call('HINCRBY', producer_key, 'groups', added)
  redis.call('HINCRBY', producer_key, 'tokens', added_tokens)
  redis.call('HSETNX', producer_key, 'first_put_ms', now)
  redis.call('HSET', producer_key, 'last_put_ms', now, 'last_version', max_version)
end
return statuses
