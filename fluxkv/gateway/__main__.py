from fluxkv.gateway.main import main

main()
