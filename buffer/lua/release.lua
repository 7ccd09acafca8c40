-- Give back admission leases whose groups will not be put.
-- ARGV: counter, dropped, lease1, lease2, ... `counter` (e.g. dropped_uniform) is raised by
-- `dropped`, the groups that were generated and then dropped; '' for unused leases.
local counter, dropped = ARGV[1], tonumber(ARGV[2])
local released = 0
for i = 3, #ARGV do
  released = released + redis.call('ZREM', K_LEASES, ARGV[i])
end
release_admission(released)
if counter ~= '' then
  redis.call('HINCRBY', K_COUNTERS, counter, dropped)
end
return released
