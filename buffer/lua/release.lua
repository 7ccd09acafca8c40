-- Give back admission leases whose groups will not be put. ARGV: lease1, lease2, ...
local released = 0
for i = 1, #ARGV do
  released = released + redis.call('ZREM', K_LEASES, ARGV[i])
end
release_admission(released)
return released
